"""One decoder step: 1 image x beam k and 32 images x beam k rows, per backend, against the hardware floor.

The reference is the tutorial's step: features tiled per beam and the encoder projection recomputed, one image
at a time. The floor (CPU) is the bytes the step must read (bench/floor.py) over the bandwidth of this run.
"""

import pytest
import torch

from bench.cases import cases, run
from bench.floor import floor_ms, step_bytes

pytestmark = pytest.mark.bench_step

CPU = ("reference", "eager", "torchscript", "ort", "ort_int8")
GPU = ("reference", "eager", "torchscript", "ort", "ort_fp16")


@pytest.mark.parametrize("device,kind,backend", cases(("step_small", "step_large"), CPU, GPU))
def test_decoder_step(benchmark, bench_suite, bench_bandwidth, device, kind, backend):
    suite = bench_suite(device)
    n = suite.cfg.n_images(kind)
    extra = {"rows": n * suite.cfg.beam_size}
    if device == "cpu":
        b = step_bytes(suite.model, n, suite.cfg.beam_size)
        bw = bench_bandwidth["bandwidth_GBps"]
        extra.update(
            bytes_read=b["read"],
            bytes_weights=b["weights"],
            bandwidth_GBps=bw,
            bandwidth=bench_bandwidth,
            floor_ms=floor_ms(b["read"], bw),
        )
    out = run(benchmark, suite, kind, backend, suite.step_fn(backend, n), **extra)
    if backend != "reference":  # parity with eager fp32 on the same inputs, outside the timed calls
        ref = suite.step_fn("eager", n)()
        diff = (out[0].float().cpu() - ref[0].float().cpu()).abs().max().item()
        benchmark.extra_info["max_abs_diff_logprobs_vs_eager"] = diff
        same_top = (out[0].argmax(-1).cpu() == ref[0].argmax(-1).cpu()).float().mean().item()
        benchmark.extra_info["top1_agreement_vs_eager"] = same_top


def test_reference_step_is_the_model_step(bench_suite):
    """The tutorial-style step (tiled features, projection recomputed) computes the same function as model.step."""
    from bench.reference import tutorial_step

    suite = bench_suite("cpu")
    words, h, c, enc_out, enc_att = suite.step_inputs(1)
    tiled = suite.tiled_features(1)[0]
    with torch.inference_mode():
        ours = suite.model.step(words, h, c, enc_out, enc_att)
        theirs = tutorial_step(suite.model.decoder, words, h, c, tiled)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
