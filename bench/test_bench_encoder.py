"""Encoder: ResNet at the benchmark's image size, batch 1 and 8, per backend (reference: one image at a time).

On CPU each row carries the encoder's arithmetic floor for its batch: 2 x MACs over the peak of this CPU measured
in the same run (bench/floor.py), fp32 peak for the fp32 paths and ONNX Runtime's int8 GEMM peak for the int8
encoder.
"""

import pytest

from bench.cases import cases, run
from bench.floor import compute_floor_ms, encoder_macs

pytestmark = pytest.mark.bench_encoder

CPU = ("reference", "eager", "eager_bf16", "torchscript", "ort", "ort_int8enc")
GPU = ("reference", "eager", "eager_bf16", "torchscript", "ort", "ort_fp16")
INT8 = ("ort_int8enc",)


@pytest.mark.parametrize("device,kind,backend", cases(("encoder_small", "encoder_large"), CPU, GPU))
def test_encoder(benchmark, bench_suite, bench_peak, device, kind, backend):
    suite = bench_suite(device)
    n = suite.cfg.n_images(kind)
    extra = {}
    if device == "cpu":
        macs = encoder_macs(suite.model)
        peak = bench_peak["int8_GOPs" if backend in INT8 else "fp32_GFLOPs"]
        extra = {"encoder_macs_per_image": macs, "peak_GFLOPs": peak, "peak": bench_peak,
                 "compute_floor_ms": compute_floor_ms(n * macs, peak)}
    run(benchmark, suite, kind, backend, suite.encode_fn(backend, n), **extra)
