"""distributed/train.py with faults injected from outside: the test-only entry point of the fault tests.

    FAULT_NAN_AT_STEP=3 python tests/support/fault_train.py --data D --out O ...      # (or under torchrun)

The trainer has no test hooks; this script patches the functions it calls, then runs its ``main()``:

    FAULT_NAN_AT_STEP=n    rank 0's loss is NaN at optimizer step n (``caption_loss`` wrapped)
    FAULT_CRASH_AT_STEP=n  rank FAULT_CRASH_RANK (default: the last) SIGKILLs itself right after optimizer step n
                           (a global optimizer step post-hook)
    FAULT_CRASH_IN_SAVE=k  rank 0 dies halfway through writing its k-th checkpoint file (``Checkpointer.writer``)
    FAULT_PARAM_HASH_DIR=D after training, each rank writes D/rank<r>.txt: a hash of its weights and buffers
    FAULT_START_DELAY=s    sleep s seconds before joining the process group, on every attempt (a slow node)

Crash faults fire on the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job recovers.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python tests/support/fault_train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from distributed import resume, train

ENV = os.environ
FIRST_ATTEMPT = ENV.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
RANK, WORLD = int(ENV.get("RANK", 0)), int(ENV.get("WORLD_SIZE", 1))
_current: dict = {}  # the TrainState of the epoch being trained (captured from train_one_epoch's arguments)


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of every tensor (identical weights <=> identical hash)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _say(message: str) -> None:
    print(f"[fault] rank {RANK}: {message}", file=sys.stderr, flush=True)


def capture_state() -> None:
    original = train.train_one_epoch

    def train_one_epoch(t, loader, cfg, env, state, *rest, **kwargs):
        _current["state"] = state
        return original(t, loader, cfg, env, state, *rest, **kwargs)

    train.train_one_epoch = train_one_epoch


def nan_at(step: int) -> None:
    original = train.caption_loss

    def caption_loss(*args, **kwargs):
        loss = original(*args, **kwargs)
        state = _current.get("state")
        if torch.is_grad_enabled() and RANK == 0 and state is not None and state.step + 1 == step:
            _say(f"injecting NaN into the loss at step {step}")
            return loss * float("nan")
        return loss

    train.caption_loss = caption_loss


def crash_at(step: int, rank: int) -> None:
    def after_step(optimizer, args, kwargs):
        state = _current.get("state")
        if RANK == rank and state is not None and state.step + 1 == step:  # (state.step counts it just after)
            _say(f"killing myself after step {step}")
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_post_hook(after_step)


def crash_in_save(k: int) -> None:
    saves = [0]

    def writer(state):
        saves[0] += 1
        if saves[0] != k:
            return lambda f: torch.save(state, f)

        def torn_write(f):
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            _say(f"dying halfway through checkpoint write #{k}")
            os._exit(3)

        return torn_write

    resume.Checkpointer.writer = staticmethod(writer)


def hash_after_training(directory: Path) -> None:
    original = train.run

    def run(cfg, env):
        result = original(cfg, env)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"rank{env.rank}.txt").write_text(state_hash(result["model"].state_dict()) + "\n")
        return result

    train.run = run


def install() -> None:
    capture_state()
    if ENV.get("FAULT_NAN_AT_STEP"):
        nan_at(int(ENV["FAULT_NAN_AT_STEP"]))
    if ENV.get("FAULT_CRASH_AT_STEP") and FIRST_ATTEMPT:
        crash_at(int(ENV["FAULT_CRASH_AT_STEP"]), int(ENV.get("FAULT_CRASH_RANK", WORLD - 1)))
    if ENV.get("FAULT_CRASH_IN_SAVE") and FIRST_ATTEMPT:
        crash_in_save(int(ENV["FAULT_CRASH_IN_SAVE"]))
    if ENV.get("FAULT_PARAM_HASH_DIR"):
        hash_after_training(Path(ENV["FAULT_PARAM_HASH_DIR"]))


if __name__ == "__main__":
    if ENV.get("FAULT_START_DELAY"):
        _say(f"starting {ENV['FAULT_START_DELAY']}s late (attempt {ENV.get('TORCHELASTIC_RESTART_COUNT', '0')})")
        time.sleep(float(ENV["FAULT_START_DELAY"]))
    install()
    sys.exit(train.main())
