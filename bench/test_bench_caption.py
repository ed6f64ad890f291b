"""Captioning end to end (encoder + beam search, fixed number of steps) and beam search alone, per backend.

Every backend runs ``core.decode.beam_search(..., early_stop=False)``: max_len steps for N images x k beams,
whatever the words, so each does the same work. The reference is the tutorial's per-image loop
(bench/reference.py). Captions are compared outside the timed calls: the fp32 exported paths must give exactly
eager fp32's captions; int8 and the bf16 encoder report their agreement rate.
"""

import pytest

from bench.cases import CFG, GPU_MARKS, cases, run
from bench.suite import APPROXIMATE, FP32_EXPORTED

CPU = ("reference", "eager", "torchscript", "ort", "ort_int8", "ort_bf16enc", "ort_int8enc", "ort_int8full", "auto")
GPU = ("reference", "eager", "torchscript", "ort", "ort_fp16")
BEAM_CPU = ("reference", "eager", "torchscript", "ort", "ort_int8")
BEAM_GPU = ("reference", "eager", "torchscript", "ort", "ort_fp16")


def _record_agreement(benchmark, suite, kind, backend, result):
    suite.captions(kind, backend, result)
    if backend != "eager":
        benchmark.extra_info["caption_agreement_vs_eager"] = suite.agreement(kind, backend)
        benchmark.extra_info["token_agreement_vs_eager"] = suite.token_agreement(kind, backend)
    if backend == "reference":
        work = suite.reference_work_per_image(kind)
        if work:  # fixed work of the batched search: max_len steps x k beams per image
            benchmark.extra_info["reference_steps_per_image"] = work["steps"]
            benchmark.extra_info["reference_rows_per_image"] = work["rows"]
            benchmark.extra_info["fixed_rows_per_image"] = suite.cfg.max_len * suite.cfg.beam_size


@pytest.mark.bench_caption
@pytest.mark.parametrize("device,kind,backend", cases(("caption_small", "caption_large"), CPU, GPU))
def test_caption_end_to_end(benchmark, bench_suite, device, kind, backend):
    suite = bench_suite(device)
    n = suite.cfg.n_images(kind)
    extra = {}
    if backend == "auto":  # what auto took for this export on this CPU, and why
        choice = suite.backend(backend).precision
        extra = {"precision": choice.value, "precision_reason": choice.reason}
    result = run(benchmark, suite, kind, backend, suite.caption_fn(backend, n), **extra)
    _record_agreement(benchmark, suite, kind, backend, result)


@pytest.mark.bench_beam
@pytest.mark.parametrize("device,kind,backend", cases(("beam_large",), BEAM_CPU, BEAM_GPU))
def test_beam_search_alone(benchmark, bench_suite, device, kind, backend):
    suite = bench_suite(device)
    n = suite.cfg.n_images(kind)
    result = run(benchmark, suite, kind, backend, suite.beam_fn(backend, n))
    _record_agreement(benchmark, suite, kind, backend, result)


def _agreement_cases():
    out = []
    for device in ("cpu", "cuda"):
        for kind, mark in (("caption_small", "bench_caption"), ("caption_large", "bench_caption"),
                           ("beam_large", "bench_beam")):
            marks = [getattr(pytest.mark, mark)] + (GPU_MARKS if device == "cuda" else [])
            out.append(pytest.param(device, kind, marks=marks, id=f"{device}-{kind}"))
    return out


@pytest.mark.parametrize("device,kind", _agreement_cases())
def test_exported_captions_identical_to_eager(bench_suite, device, kind):
    """fp32 TorchScript and ONNX Runtime give exactly eager fp32's captions on the benchmark's own inputs."""
    suite = bench_suite(device)
    eager = suite.captions(kind, "eager")
    for backend in FP32_EXPORTED:
        got = suite.captions(kind, backend)
        bad = [i for i, (a, b) in enumerate(zip(got, eager)) if a != b]
        assert not bad, f"{backend} captions differ from eager fp32 for images {bad} ({CFG.group(kind, device)})"
    approx = [b for b in APPROXIMATE if (kind, b) in suite._captions]
    for backend in approx:  # reported, not asserted
        print(f"{backend} agreement with eager fp32 ({kind}): {suite.agreement(kind, backend):.0%}")
