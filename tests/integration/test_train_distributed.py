"""torchrun on the CPU (gloo): 2 and 4 processes, both loaders, clean exits in repeated runs, the same weights on
every rank, and a rank killed mid-epoch under --max-restarts=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.checkpoint import load_checkpoint
from distributed.loaders import dali_available

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

QUICK = ["--no-final-eval", "--val-max-images", "2"]


def _case(nproc: int, loader: str, extended: bool = False):
    marks = [pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")] if loader == "dali" else []
    return pytest.param(nproc, loader, marks=marks + [pytest.mark.extended] * extended, id=f"{nproc}-{loader}")


def _hashes(directory: Path, nproc: int) -> set[str]:
    files = sorted(directory.glob("rank*.txt"))
    assert len(files) == nproc, f"expected one hash per rank, got {[f.name for f in files]}"
    return {f.read_text().strip() for f in files}


def _check(result, what: str) -> None:
    assert result.returncode == 0, f"{what}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


# Every (processes, loader) pair is extended except 2 x DALI (the default loader) and 4 x torch: the default run
# keeps each loader and each world size once.
@pytest.mark.parametrize("nproc, loader", [_case(2, "dali"), _case(4, "torch"), _case(2, "torch", extended=True),
                                           _case(4, "dali", extended=True)])
def test_torchrun_exits_zero_and_every_rank_holds_the_same_weights(run_train, tmp_path, nproc, loader):
    out = tmp_path / "run"
    runs = 2 if nproc == 2 else 1  # 4 processes share 2 cores: one run each keeps the suite short
    for attempt in range(runs):
        # The second run resumes the first one's last.pt and trains one more epoch: a second clean exit,
        # and resuming under torchrun.
        hashes = tmp_path / f"hash{attempt}"
        r = run_train(out, "--loader", loader, "--epochs", str(attempt + 1), *QUICK, nproc=nproc,
                      env={"FAULT_PARAM_HASH_DIR": str(hashes)})
        _check(r, f"run {attempt + 1} ({nproc} processes, {loader})")
        assert len(_hashes(hashes, nproc)) == 1, "ranks ended with different weights"
        assert f"{nproc} process(es)" in r.stdout
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] == runs and saved["world_size"] == nproc
    if runs == 2:
        assert "resumed from" in r.stdout


def test_killed_rank_restarts_and_resumes_from_the_last_checkpoint(run_train, tmp_path):
    """Rank 1 dies (SIGKILL) after step 3; the step-2 checkpoint is the newest; torchrun restarts both ranks once,
    they resume at step 2 (batch 2 of epoch 1) and finish the 2 epochs (3 steps each with 2 x 8 per step)."""
    out = tmp_path / "run"
    r = run_train(out, "--loader", "torch", "--epochs", "2", "--save-every", "2", *QUICK, nproc=2, max_restarts=1,
                  env={"FAULT_CRASH_AT_STEP": "3", "FAULT_CRASH_RANK": "1", "FAULT_PARAM_HASH_DIR": str(tmp_path / "h")})
    _check(r, "run with a killed rank")
    assert "killing myself after step 3" in r.stderr
    assert "resumed from" in r.stdout and "batch 2, step 2" in r.stdout
    saved = load_checkpoint(out / "last.pt")
    assert (saved["step"], saved["epoch"]) == (6, 2)
    assert len(_hashes(tmp_path / "h", 2)) == 1
