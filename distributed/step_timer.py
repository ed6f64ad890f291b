"""Where a training step's time goes: waiting for data, the encoder, the decoder, the all-reduce, the optimizer.

    timer = StepTimer(model.encoder, device)
    for batch in loader:               # timer.mark("data") first thing in the loop body: the wait for this batch
        ... forward, backward ...      # timer.mark("compute"): the encoder's share is split out by hooks
        ... all_reduce ...             # timer.mark("all-reduce")
        ... optimizer step ...         # timer.mark("optimizer")
        timer.skip()                   # logging and checkpoints are not step time
    print(timer.line())                # "data 2% | encoder 71% | decoder 24% | all-reduce 0% | optimizer 3%"

The encoder's forward (and its backward, when it trains) is timed by hooks on the module, so the training loop's
own lines stay as they are; "decoder" is the rest of forward + backward (the loss included). DDP all-reduces
gradients in buckets during the backward pass, overlapped with it: that time is inside encoder/decoder; the
"all-reduce" phase is the loop's own collective (the mean loss and the stop flag), which waits for the slowest rank.
On a GPU every mark synchronizes the device (a few microseconds), so the shares are of real work, not of launches.
"""

from __future__ import annotations

import time

import torch

PHASES = ("data", "encoder", "decoder", "all-reduce", "optimizer")


class StepTimer:
    def __init__(self, encoder: torch.nn.Module, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.interval = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()
        self._encoder = 0.0  # encoder seconds inside the current compute span
        self._started: float | None = None
        # The encoder's backward is the last part of the backward pass (it ran first): from the gradient of its
        # output to the end of backward() is the encoder's.
        self._hooks = [encoder.register_forward_pre_hook(self._begin), encoder.register_forward_hook(self._end),
                       encoder.register_full_backward_pre_hook(self._begin)]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _begin(self, *_) -> None:
        self._started = self._now()

    def _end(self, *_) -> None:
        if self._started is not None:
            self._encoder += self._now() - self._started
            self._started = None

    def mark(self, phase: str) -> None:
        """The time since the previous mark went to ``phase`` ("compute": split into encoder and decoder)."""
        now = self._now()
        span = now - self._last
        if phase == "compute":
            self._end()  # an encoder backward still open ends with the backward pass
            encoder = min(self._encoder, span)
            self.interval["encoder"] += encoder
            self.interval["decoder"] += span - encoder
            self._encoder = 0.0
        else:
            self.interval[phase] += span
        self._last = now

    def skip(self) -> None:
        """Time since the last mark is none of the phases (logging, saving a checkpoint)."""
        self._last = self._now()

    def shares(self) -> dict[str, float]:
        total = sum(self.interval.values())
        return {k: v / total if total > 0 else 0.0 for k, v in self.interval.items()}

    def line(self) -> str:
        """The interval's shares, one line; starts a new interval."""
        text = " | ".join(f"{k} {100 * v:.0f}%" for k, v in self.shares().items())
        self.interval = dict.fromkeys(PHASES, 0.0)
        return text

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
