"""The benchmark suite's quick mode runs end to end: pytest-benchmark JSON, report.md, chart (speed not judged).

    pytest tests/test_bench_smoke.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("pytest_benchmark")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
def test_quick_benchmark_report(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, SAT_BENCH_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "report.py"), "--quick", "--cpu-only", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"bench/report.py --quick failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"

    data = json.loads((out / "latest.json").read_text())
    kinds = {(b["extra_info"].get("kind"), b["extra_info"].get("backend")) for b in data["benchmarks"]}
    for kind in ("encoder_small", "encoder_large", "step_small", "step_large", "caption_small", "caption_large", "beam_large"):
        assert (kind, "reference") in kinds and (kind, "ort") in kinds, f"missing {kind} rows"
    assert any(b["extra_info"].get("floor_ms") for b in data["benchmarks"]), "no decoder-step floor recorded"

    report = (out / "report.md").read_text()
    for needle in ("## Targets (CPU)", "## Results on CPU", "vs reference", "memory floor", "onnxruntime", "## Hardware floor"):
        assert needle in report, f"report.md lacks {needle!r}"
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
