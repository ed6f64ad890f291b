"""Caption agreement of the approximate paths on a trained model (bench/agreement.py), when one is given.

    SAT_BENCH_DEMO_EXPORT=/tmp/demo_int8 SAT_BENCH_DEMO_DATA=/tmp/demo_native/data pytest bench/ -k agreement

Skipped without those variables (the suite's own model has random weights). The int8 encoder + step path must
meet the export's threshold (>= 95% identical captions, |dBLEU-4| <= 0.01 against the references).
"""

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench_caption

EXPORT, DATA = os.environ.get("SAT_BENCH_DEMO_EXPORT"), os.environ.get("SAT_BENCH_DEMO_DATA")


@pytest.mark.skipif(not (EXPORT and DATA), reason="SAT_BENCH_DEMO_EXPORT / SAT_BENCH_DEMO_DATA not set")
def test_trained_model_caption_agreement(bench_cfg):
    from bench.agreement import agreement

    rows = agreement(Path(EXPORT), Path(DATA), limit=int(os.environ.get("SAT_BENCH_DEMO_IMAGES", "600")),
                     threads=bench_cfg.num_threads)
    for name, rec in rows.items():
        if isinstance(rec, dict):
            print(f"\n{name}: {rec['why']}")
    assert rows["ort_int8full"]["meets_int8_threshold"], rows["ort_int8full"]["why"]
