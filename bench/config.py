"""Shapes, sizes and rounds of the benchmark suite: the full run and the quick (CI smoke) run.

The full run uses the tutorial's real shapes (ResNet-101 at 256x256 -> 14x14x2048 features, attention, embedding
and decoder 512, vocabulary 2,600 words, beam 5, 20 words). The quick run keeps every code path but shrinks the
shapes (ResNet-18 at 64 px, small dims and vocabulary, 4 images) so the whole suite runs in seconds.

Which one runs: ``SAT_BENCH_QUICK=1`` (set by ``python bench/report.py --quick``) or ``pytest bench --bench-quick``.
``SAT_BENCH_THREADS`` (default: every core) sets torch's and ONNX Runtime's intra-op threads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

from core.model import ModelConfig


@dataclass(frozen=True)
class BenchConfig:
    quick: bool
    model: ModelConfig  # the shapes of the benchmarked model (vocab_size included: no data to read it from)
    # search
    beam_size: int = 5
    max_len: int = 20
    # batch sizes
    encoder_batches: tuple[int, ...] = (1, 8)
    images_small: int = 1  # "1 image" groups
    images_large: int = 32  # "32 images" groups
    # rounds per group (each round is one call; one untimed warm-up call precedes them)
    rounds: dict = field(default_factory=dict)
    bandwidth_mb: int = 512  # size of the array copied to measure memory bandwidth
    # held-out images of export_model's own int8 check, which decides what --precision auto (the "auto" rows)
    # runs: few, because this check runs in the set-up, whose time counts against the budget
    export_calib_images: int = 8
    threads: int = 0  # 0: os.cpu_count()
    seed: int = 0

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def rounds_for(self, kind: str, backend: str = "") -> int:
        """Rounds for one benchmark: the reference of the large groups costs seconds per call, so it gets fewer."""
        key = f"{kind}:{backend}"
        return int(self.rounds.get(key, self.rounds.get(kind, 3)))

    def warmup_for(self, kind: str, backend: str) -> int:
        """Untimed calls before the rounds: TorchScript's profiling executor optimizes on its second call."""
        if self.quick:
            return 0  # the quick run proves the code paths, it does not judge speed
        if backend == "torchscript":
            return 2
        if backend == "reference" and kind in ("caption_large", "beam_large"):
            return 0  # seconds per call; the same code ran warm in the 1-image group just before
        return 1

    def n_images(self, kind: str) -> int:
        if kind == "encoder_small":
            return self.encoder_batches[0]
        if kind == "encoder_large":
            return self.encoder_batches[-1]
        return self.images_small if kind.endswith("small") else self.images_large

    def group(self, kind: str, device: str = "cpu") -> str:
        """The pytest-benchmark group of a kind of benchmark: the rows printed side by side."""
        n, k = self.n_images(kind), self.beam_size
        images = f"{n} image" + ("s" if n > 1 else "")
        name = {
            "encoder_small": f"encoder, batch {n}",
            "encoder_large": f"encoder, batch {n}",
            "step_small": f"decoder step, {images} x beam {k}",
            "step_large": f"decoder step, {images} x beam {k}",
            "caption_small": f"end to end, {images}, beam {k}, {self.max_len} steps",
            "caption_large": f"end to end, {images}, beam {k}, {self.max_len} steps",
            "beam_large": f"beam search alone, {images} x beam {k}, {self.max_len} steps",
        }[kind]
        return name if device == "cpu" else f"[{device}] {name}"

    def model_key(self) -> str:
        """Identifies the model and its export: equal keys may share one exported directory."""
        shape = {**self.model.to_dict(), "seed": self.seed}
        return hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> dict:
        """Flat (the model's fields beside the run's): the ``config`` of every results file."""
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        return {**self.model.to_dict(), **d, "num_threads": self.num_threads, "num_pixels": self.model.num_pixels}


FULL_ROUNDS = {
    "encoder_small": 10,
    "encoder_large": 5,
    "step_small": 50,
    "step_large": 10,
    "step_large:reference": 3,
    "caption_small": 5,
    "caption_small:reference": 3,
    "caption_large": 2,  # seconds per call: 2 rounds after a warm-up
    # The reference's 32-image calls take 15-20 s on the AVX-512 machine and 3x that on an AVX2-only one: one round
    # (its code ran warm in the 1-image group before), so the suite fits its time budget on both kinds.
    "caption_large:reference": 1,
    "beam_large": 3,
    "beam_large:reference": 1,
}

QUICK_ROUNDS = {k: (3 if k.startswith("step") else 1) for k in FULL_ROUNDS}


def full_config(threads: int = 0) -> BenchConfig:
    return BenchConfig(
        quick=False,
        model=ModelConfig(vocab_size=2600, backbone="resnet101", image_size=256, encoded_size=14, attention_dim=512,
                          embed_dim=512, decoder_dim=512),
        rounds=dict(FULL_ROUNDS),
        threads=threads,
    )


def quick_config(threads: int = 0) -> BenchConfig:
    return BenchConfig(
        quick=True,
        # ResNet-18 at 64 px gives a 2x2 map
        model=ModelConfig(vocab_size=200, backbone="resnet18", image_size=64, encoded_size=2, attention_dim=64,
                          embed_dim=64, decoder_dim=64),
        max_len=6,
        encoder_batches=(1, 2),
        images_large=4,
        rounds=dict(QUICK_ROUNDS),
        bandwidth_mb=64,
        # one thread: the smoke run must not depend on the machine being idle (OpenMP barriers stall when
        # another process holds the second core)
        threads=threads or 1,
    )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def config_from_env(quick: bool | None = None) -> BenchConfig:
    if quick is None:
        quick = env_flag("SAT_BENCH_QUICK")
    threads = int(os.environ.get("SAT_BENCH_THREADS", "0") or 0)
    return quick_config(threads) if quick else full_config(threads)
