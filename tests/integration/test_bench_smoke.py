"""The benchmark suite: the quick mode runs end to end, a killed run keeps what it measured and still renders, the
budget and the CPU's bf16 decide what runs (no timing is asserted).

    pytest tests/integration/test_bench_smoke.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import plan, results
from bench.config import quick_config
from core import hardware

ROOT = Path(__file__).resolve().parents[2]
REPORT = [sys.executable, str(ROOT / "bench" / "report.py")]
ENV = dict(os.environ, SAT_BENCH_THREADS="1", PYTHONPATH=str(ROOT))

pytest.importorskip("pytest_benchmark")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def fake_hw(native_bf16: bool, capability: str = "AVX2") -> hardware.Hardware:
    flags = frozenset({"avx2", "fma"} | ({"avx512f", "avx512_bf16"} if native_bf16 else set()))
    return hardware.Hardware(cpu=hardware.CpuInfo(model="fake EPYC", capability=capability, native_bf16=native_bf16,
                                                  flags=flags, cores=2))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_quick_benchmark_report(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(REPORT + ["--quick", "--cpu-only", "--out", str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench/report.py --quick failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"

    data = results.load(results.newest(out))
    assert data["end"]["exitstatus"] == 0
    kinds = {(b["extra_info"].get("kind"), b["extra_info"].get("backend")) for b in data["benchmarks"]}
    for kind in ("encoder_small", "encoder_large", "step_small", "step_large", "caption_small", "caption_large", "beam_large"):
        assert (kind, "reference") in kinds and (kind, "ort") in kinds, f"missing {kind} rows"
    assert any(b["extra_info"].get("floor_ms") for b in data["benchmarks"]), "no decoder-step floor recorded"
    tag = hardware.capability_tag()
    assert {b["cpu"] for b in data["benchmarks"]} == {tag}

    report = (out / "report.md").read_text()
    for needle in (f"## Targets (CPU {tag})", "## Results on CPU", "vs reference", "memory floor", "onnxruntime",
                   "## Hardware floor"):
        assert needle in report, f"report.md lacks {needle!r}"
    tables = [line for line in report.splitlines() if line.startswith("### ")]
    assert tables and all(f"CPU {tag}" in line for line in tables), tables
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.slow
def test_killed_run_keeps_its_results_and_renders(tmp_path):
    """SIGKILL the whole run once two benchmarks are on disk: they stay, and the report renders from them.

    Two groups and a tight poll: the quick step group alone wrote its last ten records within 0.2 s of the second,
    so the run could end before the kill (one failure seen)."""
    out = tmp_path / "results"
    proc = subprocess.Popen(REPORT + ["--quick", "--cpu-only", "--groups", "step,caption", "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            path = results.newest(out)
            if path and sum(r["type"] == "benchmark" for r in _records(path)) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # report.py and its pytest child, mid-run
        proc.wait()
    measured = [r for r in _records(path) if r["type"] == "benchmark"]
    assert len(measured) >= 2 and not any(r["type"] == "end" for r in _records(path))

    done = subprocess.run(REPORT + ["--from-results", "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (out / "report.md").read_text()
    assert "This run was cut short" in report and "not run: the run was cut short before it" in report
    for r in measured:
        assert f"### {r['group']} (CPU {r['cpu']})" in report


def test_report_renders_budget_and_bf16_rows(tmp_path):
    """A results file with not-run rows and no end record (a cut run) renders; every left-out row is named."""
    from bench import report

    tag = "AVX2"
    path = tmp_path / "bench-1.jsonl"
    rec = results.Recorder(path)
    planned = ["test_decoder_step[cpu-step_small-ort]", "test_encoder[cpu-encoder_small-eager_bf16]",
               "test_caption_end_to_end[cpu-caption_large-reference]", "test_encoder[cpu-encoder_large-ort]"]
    rec.write({"type": "run", "capability": tag, "machine": {"cpu_model": "fake", "cpu_cores": 2},
               "config": quick_config().describe(), "planned": [{"name": n, "group": "g"} for n in planned]})
    stats = {"median": 0.002, "min": 0.002, "max": 0.003, "rounds": 3}
    rec.write({"type": "benchmark", "name": planned[0], "group": "decoder step, 1 image x beam 5", "stats": stats,
               "extra_info": {"kind": "step_small", "backend": "ort", "device": "cpu"}, "cpu": tag})
    rec.write({"type": "not_run", "name": planned[1], "group": "g", "reason": plan.not_run_reason(
        {"test": "test_encoder", "device": "cpu", "backend": "eager_bf16"}, fake_hw(native_bf16=False))})
    rec.write({"type": "not_run", "name": planned[2], "group": "g", "reason": "not run: budget (needs about 60 s)"})
    with path.open("a") as f:
        f.write('{"type": "benchmark", "name": "half a li')  # killed mid-write

    report.render(path, tmp_path, "python bench/report.py", None)
    text = (tmp_path / "report.md").read_text()
    assert f"### decoder step, 1 image x beam 5 (CPU {tag})" in text and f"## Targets (CPU {tag})" in text
    assert "no native bf16" in text and "not run: budget" in text
    assert f"| {planned[3]} | g | not run: the run was cut short before it |" in text


def test_bf16_rows_follow_the_cpu():
    """Emulated bf16 is not benchmarked; native bf16 is, and GPU rows never depend on the CPU."""
    no, yes = fake_hw(native_bf16=False), fake_hw(native_bf16=True, capability="AVX512")
    for params in ({"test": "test_encoder", "device": "cpu", "kind": "encoder_small", "backend": "eager_bf16"},
                   {"test": "test_caption_end_to_end", "device": "cpu", "kind": "caption_large", "backend": "ort_bf16enc"},
                   {"test": "test_train_step_cpu", "amp": "torch.bfloat16", "channels_last": True}):
        assert "no native bf16" in plan.not_run_reason(params, no)
        assert plan.not_run_reason(params, yes) is None
    assert plan.not_run_reason({"test": "test_encoder", "device": "cpu", "backend": "ort"}, no) is None
    assert plan.not_run_reason({"test": "test_encoder", "device": "cuda", "backend": "eager_bf16"}, no) is None
    assert plan.not_run_reason({"test": "test_train_step_gpu", "amp": "torch.bfloat16"}, no) is None


def test_budget_orders_and_leaves_out_what_does_not_fit(monkeypatch):
    cfg = quick_config()
    first = {"test": "test_caption_end_to_end", "device": "cpu", "kind": "caption_small", "backend": "ort"}
    train = {"test": "test_train_step_cpu", "amp": None}
    other = {"test": "test_encoder", "device": "cpu", "kind": "encoder_large", "backend": "torchscript"}
    assert plan.priority(first) < plan.priority(other) < plan.priority(train)

    assert plan.Budget.for_hardware(None, fake_hw(False)).check(first, cfg)[1] is None  # no budget: all run
    spent = plan.Budget.for_hardware(time.time() - 1, fake_hw(False))
    assert spent.check(first, cfg)[1].startswith("not run: budget")
    # The AVX2 prior, then what the machine showed: 10x slower than the estimates on 100 s of benchmarks.
    b = plan.Budget.for_hardware(None, fake_hw(False))
    assert b.slowdown == 3.0
    monkeypatch.setattr(plan, "estimate_s", lambda params, cfg, first_use=None: 10.0)
    for _ in range(10):
        b.finished(first, cfg, 100.0)
    assert 9.0 < b.slowdown < 10.0
    monkeypatch.setattr(hardware, "detect", lambda: fake_hw(native_bf16=True, capability="AVX512"))
    assert plan.Budget.for_hardware(None, hardware.detect()).slowdown == 1.0
