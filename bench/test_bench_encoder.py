"""Encoder: ResNet at the benchmark's image size, batch 1 and 8, per backend (reference: one image at a time)."""

import pytest

from bench.cases import cases, run

pytestmark = pytest.mark.bench_encoder

CPU = ("reference", "eager", "eager_bf16", "torchscript", "ort", "ort_int8enc")
GPU = ("reference", "eager", "eager_bf16", "torchscript", "ort", "ort_fp16")


@pytest.mark.parametrize("device,kind,backend", cases(("encoder_small", "encoder_large"), CPU, GPU))
def test_encoder(benchmark, bench_suite, device, kind, backend):
    suite = bench_suite(device)
    n = suite.cfg.n_images(kind)
    run(benchmark, suite, kind, backend, suite.encode_fn(backend, n))
