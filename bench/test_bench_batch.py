"""Batch captioning on Ray Data against the caption command: images/s on the same 2,000 JPEGs and export.

One row per precision (int8, fp32): the benchmark times the whole ``python -m export.batch_caption`` command (Ray's
start and the actors' model loading included); extra_info holds the images/s that the acceptance compares, the
batch command's steady rate over the caption command's loop (bench/batch_feed.py says what each includes), their
ratio (issue 22: >= 0.85), and the number of images whose captions differ (must be 0). Not in the quick run: Ray's
start alone takes longer than the whole quick suite.
"""

import importlib.util
import os

import pytest

from bench.batch_feed import caption_rate, make_inputs, run_batch
from bench.config import config_from_env

COUNT = int(os.environ.get("SAT_BENCH_BATCH_IMAGES", "2000"))
BATCH = 32

pytestmark = [
    pytest.mark.bench_batch,
    pytest.mark.skipif(config_from_env().quick, reason="not run: quick (Ray's start alone outlasts the quick suite)"),
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="not run: the [scale] extra is not installed"),
]


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("sat-bench-batch")
    return work, *make_inputs(work, COUNT)


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_batch_caption_vs_caption_command(benchmark, batch_inputs, precision):
    work, images, export_dir = batch_inputs
    cap_rate, cap_captions = caption_rate(images, export_dir, precision, BATCH)
    out = {}

    def job():
        out["figures"], out["captions"] = run_batch(images, export_dir, precision, work / f"out_{precision}",
                                                    ["--batch-size", str(BATCH)])

    benchmark.group = "batch captioning (Ray Data) vs export.caption"
    benchmark.pedantic(job, rounds=1, iterations=1)
    figures, captions = out["figures"], out["captions"]
    differ = sum(captions.get(p) != c for p, c in cap_captions.items())
    benchmark.extra_info.update(images=COUNT, precision=precision, caption_images_per_s=round(cap_rate, 1),
                                batch_steady_images_per_s=figures["steady_images_per_s"],
                                ratio=round(figures["steady_images_per_s"] / cap_rate, 3), captions_differ=differ,
                                **{f"batch_{k}": v for k, v in figures.items() if k != "steady_images_per_s"})
    assert len(captions) == COUNT and differ == 0, f"{differ} of {COUNT} captions differ from the caption command's"
