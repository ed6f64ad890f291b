"""Multi-node for real: two torchrun agents as two "nodes" on this machine (--nnodes=2, one process each, c10d
rendezvous on 127.0.0.1, distinct --node-rank), through a short training; and a node's training process killed
mid-training, the job resuming from the last checkpoint under --max-restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.checkpoint import load_checkpoint
from tests.test_robustness_launch import _descendants

REPO = Path(__file__).resolve().parent.parent
FAULT_TRAIN = REPO / "tests" / "fault_train.py"

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(rank: int, port: int, data: Path, out: Path, *flags: str, restarts: int = 0,
          env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node-rank={rank}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=multinode-test",
           f"--rdzv-conf=is_host={int(rank == 0)},join_timeout=60", "--local-addr=127.0.0.1",
           f"--max-restarts={restarts}", "--monitor-interval=0.5",
           str(FAULT_TRAIN), "--data", str(data), "--out", str(out), "--preset", "tiny", "--threads", "1",
           "--no-progress", "--loader", "torch", "--workers", "0", "--no-final-eval", "--val-max-images", "2", *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _kill_runs_of(out: Path) -> None:
    """SIGKILL every process training into ``out`` (workers whose agent died are orphans, in their own session)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"{out}\0".encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # ended meanwhile


@pytest.fixture
def out(tmp_path):
    yield tmp_path / "run"
    _kill_runs_of(tmp_path / "run")  # nothing outlives the test, whatever failed


def _finish(proc: subprocess.Popen, out: Path, timeout: float = 150) -> str:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_runs_of(out)
        log, _ = proc.communicate()
        pytest.fail(f"node did not finish in {timeout}s:\n{log[-3000:]}")
    return log


@pytest.mark.slow  # the restart test below runs the same two nodes through training, and more
def test_two_nodes_train_and_end_with_the_same_weights(synthetic_data, tmp_path, out):
    port, hashes = _free_port(), tmp_path / "hashes"
    env = {"FAULT_PARAM_HASH_DIR": str(hashes)}  # each rank writes a hash of its final weights
    nodes = [_node(rank, port, synthetic_data, out, "--epochs", "1", env=env) for rank in (0, 1)]
    logs = [_finish(n, out) for n in nodes]
    for n, log in zip(nodes, logs):
        assert n.returncode == 0, log[-3000:]
    assert "2 process(es)" in "".join(logs)
    assert len({p.read_text() for p in hashes.glob("rank*.txt")}) == 1 and len(list(hashes.glob("rank*.txt"))) == 2
    assert load_checkpoint(out / "last.pt")["world_size"] == 2


def test_a_killed_node_restarts_and_the_job_resumes_from_the_last_checkpoint(synthetic_data, tmp_path, out):
    """Node 1's training process is SIGKILLed from outside mid-training; both agents restart their workers
    (--max-restarts=2), which resume from last.pt and finish. (Replacing node 1's whole agent by a new one does not
    work with torch 2.14's c10d rendezvous: the new agent waits forever for the master address, which the old
    rank-0 agent only publishes in its first round; see README.)"""
    port = _free_port()
    flags = ("--epochs", "4", "--save-every", "2")
    hashes = tmp_path / "hashes"  # each rank writes a hash of its final weights
    # Two restarts, not one: the restarted workers can fail to meet once more while the other node's worker is still
    # starting (gloo's connectFullMesh "Connection refused", seen in one fresh-clone CI run of five), and the next
    # round then succeeds; a real multi-node job needs that budget for the same reason.
    nodes = [_node(rank, port, synthetic_data, out, *flags, restarts=2, env={"FAULT_PARAM_HASH_DIR": str(hashes)})
             for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while not (out / "last.pt").is_file():  # the first checkpoint: from here a restart has something to resume
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "no checkpoint was written"
        time.sleep(0.1)
    workers = _descendants(nodes[1].pid) - {nodes[1].pid}
    assert workers, "node 1 has no training process"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    logs = [_finish(n, out) for n in nodes]
    for n in nodes:
        assert n.returncode == 0, "\n=====\n".join(x[-4000:] for x in logs)
    assert "resumed from" in "".join(logs) and "2 process(es)" in "".join(logs), logs[0][-3000:]
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 4 and saved["world_size"] == 2
    assert len(list(hashes.glob("rank*.txt"))) == 2 and len({p.read_text() for p in hashes.glob("rank*.txt")}) == 1
