"""The GPU check (tools/gpu_check.py): its clean skip without a GPU, the summary/exit-code logic, the time-boxing,
and a CPU rehearsal of its parity worker. The GPU run itself is `./launch.sh gpu-check` on a GPU machine.

    pytest tests/integration/test_gpu_check.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.support.export_artifacts import artifacts

from tools import gpu_check as gc

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the check would run, not skip")
def test_launch_gpu_check_skips_cleanly_without_a_gpu():
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), "gpu-check"], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu-check: SKIPPED: no CUDA GPU visible (")
    assert lines[0].endswith("nothing was checked")


# ------------------------------------------------------------------------------------------- the aggregator
def _ok():
    return "fine"


def _fails():
    raise gc.CheckFailed("wrong answer")


def _crashes():
    return {}["missing"]


def _skips():
    raise gc.Skipped("needs the train check, which did not pass")


def test_a_failing_check_makes_the_exit_code_1_and_the_rest_still_run():
    logged = []
    results = gc.run_checks([("a", _ok), ("b", _fails), ("c", _crashes), ("d", _skips), ("e", _ok)], log=logged.append)
    assert [(r.name, r.status) for r in results] == [("a", "ok"), ("b", "fail"), ("c", "fail"), ("d", "skip"),
                                                     ("e", "ok")]
    assert results[1].detail == "wrong answer" and results[2].detail == "KeyError: 'missing'"
    assert gc.exit_code(results) == 1
    assert len(logged) == 5 and logged[1].startswith("[gpu-check] b: fail (")
    table = gc.format_table(results).splitlines()
    assert table[0] == "| check | status | seconds | detail |"
    assert table[3].startswith("| b | fail | ") and table[3].endswith("| wrong answer |")
    assert table[-1].startswith("| total | FAIL |")


def test_all_ok_or_skipped_exits_0():
    results = gc.run_checks([("a", _ok), ("d", _skips)], log=lambda s: None)
    assert gc.exit_code(results) == 0
    assert gc.format_table(results).splitlines()[-1].startswith("| total | ok |")


# ----------------------------------------------------------------------------------------- the time-boxing
def _ctx(tmp_path, budget_s: float) -> gc.Ctx:
    return gc.Ctx(work=tmp_path, deadline=time.monotonic() + budget_s)


def test_a_step_past_its_timeout_is_killed_and_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_STEP_S", 0.1)
    t0 = time.monotonic()
    with pytest.raises(gc.CheckFailed, match="timed out after 1s"):
        _ctx(tmp_path, 60).run("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], cap_s=1)
    assert time.monotonic() - t0 < 20
    assert (tmp_path / "logs" / "sleeper.log").is_file()


def test_a_step_that_exits_non_zero_fails_with_its_last_line(tmp_path):
    code = "import sys; print('working'); sys.exit('error: the real reason')"
    with pytest.raises(gc.CheckFailed, match="exit 1: error: the real reason"):
        _ctx(tmp_path, 60).run("bad", [sys.executable, "-c", code], cap_s=30)


def test_no_budget_left_fails_a_step_and_skips_an_optional_one(tmp_path):
    ctx = _ctx(tmp_path, 1)
    with pytest.raises(gc.CheckFailed, match="not started"):
        ctx.run("late", [sys.executable, "-c", "pass"], cap_s=30)
    with pytest.raises(gc.Skipped, match="not started"):
        ctx.run("late", [sys.executable, "-c", "pass"], cap_s=30, optional=True)


def test_the_reason_of_a_torchrun_failure_is_the_workers_exception_not_torchruns():
    log = ("Traceback (most recent call last):\n  ...\nRuntimeError: Found no NVIDIA driver on your system.\n"
           "E1125 failed (exitcode: 1)\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
           "============================================================\n")
    assert gc.failure_reason(log) == "RuntimeError: Found no NVIDIA driver on your system."
    assert gc.last_line("ok\n2 passed in 1.0s\n=====\n") == "2 passed in 1.0s"


def test_pytest_counts_reads_the_summary_line():
    text = "....\nSKIPPED [1] tests/x.py:3: no GPU\n2 passed, 1 skipped, 328 deselected in 13.60s\n"
    assert gc.pytest_counts(text) == {"passed": 2, "skipped": 1, "deselected": 328}


# ------------------------------------------------------------------------------------ the parity worker
@pytest.mark.slow
def test_parity_worker_rehearsed_on_the_cpu(tmp_path_factory):
    """The worker's JSON, which check_ort_parity reads, from the same code path with the CPU provider."""
    art = artifacts(tmp_path_factory)
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--worker", "parity", str(art.export_dir),
                           str(art.checkpoint), str(art.data_dir), "cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["providers"][0] == "CPUExecutionProvider" and not r["io_binding"]
    assert r["images"] == gc.PARITY_IMAGES and r["identical"] == r["images"]
    assert r["logprob_max_diff"] < gc.LOGPROB_TOL
