"""SCST under torchrun (gloo, 2 processes): a rank killed mid-epoch, both restarted, resumed at the saved step,
the same weights on every rank at the end, and the reward, baseline and sampled length in the log."""

from __future__ import annotations

import pytest

from core.checkpoint import load_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_scst_with_two_processes_resumes_after_a_kill_at_the_saved_step(run_train, tmp_path):
    out = tmp_path / "run"
    hashes = tmp_path / "h"
    # step 1 is cross-entropy, SCST from step 2 on (--scst-after 1); rank 1 dies after step 3, last.pt holds step 2
    r = run_train(out, "--loader", "torch", "--epochs", "2", "--save-every", "2", "--no-final-eval",
                  "--val-max-images", "2", "--scst-after", "1", "--scst-samples", "2", "--max-decode-len", "8",
                  "--progress", "--log-every", "1", nproc=2, max_restarts=1,
                  env={"FAULT_CRASH_AT_STEP": "3", "FAULT_CRASH_RANK": "1", "FAULT_PARAM_HASH_DIR": str(hashes)})
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "killing myself after step 3" in r.stderr
    assert "resumed from" in r.stdout and "batch 2, step 2" in r.stdout
    assert "SCST from step 1: 2 samples per image, greedy baseline" in r.stdout
    logged = [line for line in r.stdout.splitlines() if " step " in line and "| loss" in line]
    assert "scst reward" not in next(line for line in logged if "step 1 |" in line)  # cross-entropy
    assert all("scst reward" in line and "baseline" in line and "length" in line
               for line in logged if "step 1 |" not in line)
    saved = load_checkpoint(out / "last.pt")
    assert (saved["step"], saved["epoch"]) == (6, 2)
    files = sorted(hashes.glob("rank*.txt"))
    assert len(files) == 2 and len({f.read_text() for f in files}) == 1, "ranks ended with different weights"
