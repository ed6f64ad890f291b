"""What the benchmark run does, in which order, and what it leaves out: priorities, a time budget, bf16 rows.

    python bench/report.py --budget-min 8        # the report passes the deadline on (SAT_BENCH_DEADLINE)
    pytest bench/ --bench-budget-min 8           # the same for a plain pytest run

- Order: the rows behind the report's targets first (ORT and the reference, 1 then 32 images), then the fp32
  correctness checks, then the encoder and the other backends, the training benchmarks last. A run cut short,
  by the budget or by a kill, has measured what matters most.
- Budget: before each benchmark, its time is estimated (seconds per call measured on the AVX-512 machine,
  times its calls, times how much slower this machine has been so far than those figures); one that would end
  past the deadline is not started and is recorded as "not run: budget".
- bf16: on a CPU without native bf16 (``core.hardware``), bf16 autocast is emulated and about 30x slower than
  fp32, so those rows are not run and recorded with that note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bench.config import BenchConfig
from core import hardware

BF16_BACKENDS = ("eager_bf16", "ort_bf16enc")

# Run order: (test function, kind, backend); None matches anything. Unlisted tests run last, in file order.
PRIORITY: list[tuple[str, str | None, str | None]] = [
    ("test_caption_end_to_end", "caption_small", "ort"),
    ("test_caption_end_to_end", "caption_small", "reference"),
    ("test_decoder_step", "step_small", "ort"),
    ("test_decoder_step", "step_small", "ort_int8"),
    ("test_beam_search_alone", "beam_large", "ort"),
    ("test_beam_search_alone", "beam_large", "reference"),
    ("test_caption_end_to_end", "caption_small", "auto"),
    ("test_caption_end_to_end", "caption_large", "ort"),
    ("test_caption_end_to_end", "caption_large", "reference"),
    ("test_caption_end_to_end", "caption_large", "auto"),
    ("test_exported_captions_identical_to_eager", None, None),
    ("test_reference_step_is_the_model_step", None, None),
    ("test_encoder", None, "ort"),
    ("test_encoder", None, "reference"),
    ("test_encoder", None, "eager"),
    ("test_decoder_step", None, None),
    ("test_caption_end_to_end", "caption_small", None),
    ("test_beam_search_alone", None, None),
    ("test_encoder", None, None),
    ("test_caption_end_to_end", None, None),
    ("test_train_vs_tutorial", None, None),
    ("test_train_step_cpu", None, None),
    ("test_loader_cpu", None, None),
]

# Seconds per call on the AVX-512 bf16 machine (2 threads, full shapes); "*" for the kind's other backends.
CALL_S: dict[str, dict[str, float]] = {
    "encoder_small": {"reference": 0.17, "eager": 0.16, "eager_bf16": 0.08, "torchscript": 0.15, "ort": 0.11,
                      "*": 0.1},
    "encoder_large": {"reference": 1.4, "eager": 1.3, "eager_bf16": 0.65, "torchscript": 1.2, "ort": 0.9, "*": 0.8},
    "step_small": {"reference": 0.02, "*": 0.006},
    "step_large": {"reference": 0.5, "*": 0.08},
    "caption_small": {"reference": 2.0, "*": 0.3},
    "caption_large": {"reference": 16.0, "eager": 8.0, "torchscript": 7.5, "ort": 4.5, "*": 4.0},
    "beam_large": {"reference": 16.0, "eager": 2.5, "torchscript": 2.5, "ort": 1.0, "*": 0.8},
}
# Once per run, in the first benchmark that needs it: loading the int8 encoder and the traces, and for each
# kind the eager fp32 inputs and captions every backend is compared with.
FIRST_USE_S = {"ort_int8enc": 1.0, "torchscript": 3.0, "caption_small": 0.5, "caption_large": 8.0,
               "beam_large": 8.0, "step_large": 4.0, "encoder_large": 1.0}
TEST_S = {"test_exported_captions_identical_to_eager": 10.0, "test_reference_step_is_the_model_step": 1.0,
          "test_train_step_cpu": 8.0, "test_loader_cpu": 10.0,
          "test_batch_caption_vs_caption_command": 60.0,  # 2,000 images each way, Ray's start (measured on AVX2)
          # per row at 32 images a step, the module's set-up (model, cache build, GEMM peak) spread over its rows;
          # 3x on AVX2-only
          "test_train_vs_tutorial": 30.0}
QUICK_CALL_S = 0.05  # the quick shapes: the suite's set-up dominates


def item_params(item) -> dict[str, Any]:
    """A pytest item's parameters plus its test function's name ("test")."""
    params = dict(getattr(getattr(item, "callspec", None), "params", {}) or {})
    params["test"] = getattr(item, "originalname", item.name)
    return params


def priority(params: dict[str, Any]) -> int:
    for i, (test, kind, backend) in enumerate(PRIORITY):
        if params["test"] == test and kind in (None, params.get("kind")) and backend in (None, params.get("backend")):
            return i
    return len(PRIORITY)


def order(items: list) -> None:
    """Sort pytest items in place by priority (stable: file order within a priority)."""
    items.sort(key=lambda item: priority(item_params(item)))


def not_run_reason(params: dict[str, Any], hw: hardware.Hardware) -> str | None:
    """Why a row is left out on this hardware, or None. Only CPU rows depend on the CPU's bf16."""
    if params.get("device", "cpu") != "cpu" or params["test"].endswith("_gpu"):
        return None
    bf16 = params.get("backend") in BF16_BACKENDS or str(params.get("amp")) in ("torch.bfloat16", "bf16")
    if bf16 and not hw.cpu.native_bf16:
        return (f"not run: this CPU ({hardware.capability_tag(hw)}) has no native bf16; bf16 autocast would be "
                "emulated, about 30x slower than fp32")
    return None


def estimate_s(params: dict[str, Any], cfg: BenchConfig, first_use: tuple[str, ...] | None = None) -> float:
    """Seconds a benchmark takes on the AVX-512 machine: (warm-up + rounds) x seconds per call + first uses."""
    if params["test"] in TEST_S:
        return QUICK_CALL_S if cfg.quick else TEST_S[params["test"]]
    kind, backend = params.get("kind"), params.get("backend", "")
    if kind not in CALL_S:
        return 1.0
    first_use = (kind, backend) if first_use is None else first_use
    calls = cfg.warmup_for(kind, backend) + cfg.rounds_for(kind, backend)
    if cfg.quick:
        return (calls + 1) * QUICK_CALL_S
    per_call = CALL_S[kind].get(backend, CALL_S[kind]["*"])
    return calls * per_call + sum(FIRST_USE_S.get(x, 0.0) for x in first_use)


@dataclass
class Budget:
    """A deadline, and how much slower than CALL_S this machine has been so far (learned as benchmarks finish)."""

    deadline: float | None  # time.time() after which nothing starts; None: no budget
    prior_slowdown: float = 1.0
    _estimated: float = 0.0
    _actual: float = 0.0
    _first_use: set[str] = field(default_factory=set)

    PRIOR_WEIGHT_S = 5.0  # the prior counts like this many seconds of measured benchmarks

    @classmethod
    def for_hardware(cls, deadline: float | None, hw: hardware.Hardware) -> "Budget":
        # CALL_S was measured with AVX-512; an AVX2-only CPU ran fp32 convolutions 2.5-4.5x slower.
        return cls(deadline, prior_slowdown=1.0 if hw.cpu.capability.startswith("AVX512") else 3.0)

    @property
    def slowdown(self) -> float:
        w = self.PRIOR_WEIGHT_S
        return (self.prior_slowdown * w + self._actual) / (w + self._estimated)

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    def check(self, params: dict[str, Any], cfg: BenchConfig) -> tuple[float, str | None]:
        """(estimated seconds here, a "not run: budget" reason or None)."""
        est = self._estimate(params, cfg) * self.slowdown
        left = self.remaining_s()
        if left is not None and est > left:
            return est, f"not run: budget (needs about {est:.3g} s, {max(left, 0):.0f} s of the budget left)"
        return est, None

    def finished(self, params: dict[str, Any], cfg: BenchConfig, seconds: float) -> None:
        self._estimated += self._estimate(params, cfg)
        self._actual += seconds
        self._first_use.update((params.get("kind", ""), params.get("backend", "")))

    def _estimate(self, params: dict[str, Any], cfg: BenchConfig) -> float:
        fresh = tuple(x for x in (params.get("kind", ""), params.get("backend", "")) if x not in self._first_use)
        return estimate_s(params, cfg, first_use=fresh)
