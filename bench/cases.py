"""Parametrization shared by the benchmark modules: (device, kind, backend) cases with their group marks."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import pytest

from bench.config import config_from_env
from bench.suite import cuda_available

CFG = config_from_env()  # conftest's pytest_configure has set SAT_BENCH_QUICK before this import
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU")]


def cases(kinds: Sequence[str], cpu_backends: Sequence[str], gpu_backends: Sequence[str]) -> list:
    """One pytest.param per (device, kind, backend), marked with its benchmark group (and gpu)."""
    out = []
    for device, backends in (("cpu", cpu_backends), ("cuda", gpu_backends)):
        for kind in kinds:
            for backend in backends:
                marks: list[Any] = [pytest.mark.benchmark(group=CFG.group(kind, device))]
                if device == "cuda":
                    marks += GPU_MARKS
                out.append(pytest.param(device, kind, backend, marks=marks, id=f"{device}-{kind}-{backend}"))
    return out


def run(benchmark, suite, kind: str, backend: str, fn: Callable[[], Any], **extra: Any) -> Any:
    """Time fn (one call a round) with the config's rounds; record what the report needs in extra_info."""
    cfg = suite.cfg
    benchmark.extra_info.update(
        kind=kind,
        backend=backend,
        device=suite.device,
        images=cfg.n_images(kind),
        beam=cfg.beam_size,
        max_len=cfg.max_len,
        quick=cfg.quick,
        threads=cfg.num_threads,
        **extra,
    )
    return benchmark.pedantic(
        fn, rounds=cfg.rounds_for(kind, backend), iterations=1, warmup_rounds=cfg.warmup_for(kind, backend)
    )
