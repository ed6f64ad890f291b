"""Multi-node for real: two torchrun agents as two "nodes" on this machine (--nnodes=2, one process each, c10d
rendezvous on 127.0.0.1, distinct --node-rank), and the faults of a real cluster injected from outside: a node's
training process killed (either node, with the other node slow to start), killed while it writes a checkpoint,
stopped (SIGSTOP) instead of dying, a restart that finds a checkpoint of another world size, and a whole node
replaced by a new agent. Each job must end with both ranks holding the same weights, resumed from the last
checkpoint (distributed/round_store.py says why restarts used to fail one time in three)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.checkpoint import load_checkpoint
from tests.support.processes import descendants

REPO = Path(__file__).resolve().parents[2]
FAULT_TRAIN = REPO / "tests" / "support" / "fault_train.py"
TRAIN = ("--preset", "tiny", "--threads", "1", "--no-progress", "--loader", "torch", "--workers", "0",
         "--no-final-eval", "--val-max-images", "2")
RESUMED = re.compile(r"resumed from .*step (\d+)")

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One torchrun agent standing for one node; its output is read as it comes, each line with its arrival time."""

    def __init__(self, rank: int, port: int, data: Path, out: Path, *flags: str, restarts: int = 1,
                 env: dict | None = None, rdzv_conf: str = "") -> None:
        conf = f"is_host={int(rank == 0)},join_timeout=60" + (f",{rdzv_conf}" if rdzv_conf else "")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               f"--node-rank={rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=multinode-test", f"--rdzv-conf={conf}", "--local-addr=127.0.0.1",
               f"--max-restarts={restarts}", "--monitor-interval=0.5",
               str(FAULT_TRAIN), "--data", str(data), "--out", str(out), *TRAIN, *flags]
        self.rank, self.out = rank, out
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def log(self) -> str:
        return "".join(line for _, line in self.lines)

    def workers(self) -> set[int]:
        pids = descendants(self.proc.pid) - {self.proc.pid}
        assert pids, f"node {self.rank} has no training process"
        return pids

    def first(self, pattern: re.Pattern, after: float) -> tuple[float, re.Match] | None:
        """The first line matching ``pattern`` that arrived after ``after`` (monotonic), with its arrival time."""
        for t, line in list(self.lines):
            if t >= after and (m := pattern.search(line)):
                return t, m
        return None

    def finish(self, timeout: float = 180) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_runs_of(self.out)
            self.proc.wait()
            self._reader.join(5)
            pytest.fail(f"node {self.rank} did not finish in {timeout}s:\n{self.log[-4000:]}")
        self._reader.join(10)
        return self.log


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


def _wait_for(condition, what: str, nodes: list[Node], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(n.proc.poll() is not None for n in nodes):
            pytest.fail(f"waited {timeout}s for {what}:\n" + "\n=====\n".join(n.log[-3000:] for n in nodes))
        time.sleep(0.05)


def _first_checkpoint_step(out: Path, nodes: list[Node]) -> int:
    """Wait for the first last.pt (from there a restart has something to resume) and return its step."""
    _wait_for(lambda: (out / "last.pt").is_file(), "the first checkpoint", nodes)
    return int(load_checkpoint(out / "last.pt")["step"])


def _finish_all(nodes: list[Node], hashes: Path, epochs: int) -> str:
    """Both agents exit 0, the run reached its last epoch with 2 processes, and both ranks hold the same weights."""
    logs = [n.finish() for n in nodes]
    everything = "\n=====\n".join(log[-5000:] for log in logs)
    for n in nodes:
        assert n.proc.returncode == 0, everything
    saved = load_checkpoint(n.out / "last.pt")
    assert saved["epoch"] == epochs and saved["world_size"] == 2, everything
    digests = [p.read_text() for p in sorted(hashes.glob("rank*.txt"))]
    assert len(digests) == 2 and len(set(digests)) == 1, f"the ranks' final weights differ:\n{everything}"
    return "".join(logs)


def _recovery(nodes: list[Node], since: float) -> tuple[float, int]:
    """Seconds from ``since`` to the first "resumed from" line of the restarted round, and the step resumed."""
    found = [hit for n in nodes if (hit := n.first(RESUMED, since))]
    assert found, "no rank resumed:\n" + "\n=====\n".join(n.log[-3000:] for n in nodes)
    t, m = min(found, key=lambda hit: hit[0])
    return t - since, int(m.group(1))


@pytest.mark.parametrize("killed, slow", [(1, None), pytest.param(0, 1, marks=pytest.mark.extended)],
                         ids=["node1-killed", "node0-killed-node1-slow-to-start"])
def test_a_killed_worker_restarts_the_round_and_the_job_resumes_from_the_last_checkpoint(
        synthetic_data, tmp_path, out, killed, slow):
    """A node's training process is SIGKILLed from outside mid-training; both agents restart their workers
    (--max-restarts=1: one fault, one restart), which meet in a fresh round, resume from last.pt and finish.
    ``slow``: that node's worker sleeps 4 s before joining the process group, on every attempt."""
    hashes = tmp_path / "hashes"  # each rank writes a hash of its final weights
    port = _free_port()
    nodes = [Node(rank, port, synthetic_data, out, "--epochs", "4", "--save-every", "2",
                  env={"FAULT_PARAM_HASH_DIR": str(hashes), **({"FAULT_START_DELAY": "4"} if rank == slow else {})})
             for rank in (0, 1)]
    step = _first_checkpoint_step(out, nodes)
    killed_at = time.monotonic()
    for pid in nodes[killed].workers():
        os.kill(pid, signal.SIGKILL)
    log = _finish_all(nodes, hashes, epochs=4)
    seconds, resumed_step = _recovery(nodes, killed_at)
    assert resumed_step >= step and "2 process(es)" in log
    assert "a node replaced by a new agent cannot join" in log  # the default shared store: the workers say so
    print(f"recovery: {seconds:.1f}s from the kill to training again (resumed at step {resumed_step})")


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(synthetic_data, tmp_path, out):
    """Rank 0 dies halfway through its second checkpoint write (the fault harness tears the file): the torn
    temporary is never trusted; both ranks restart from the first checkpoint, intact."""
    hashes = tmp_path / "hashes"
    port = _free_port()
    env = {"FAULT_PARAM_HASH_DIR": str(hashes), "FAULT_CRASH_IN_SAVE": "2"}
    nodes = [Node(rank, port, synthetic_data, out, "--epochs", "3", "--save-every", "2", env=env) for rank in (0, 1)]
    log = _finish_all(nodes, hashes, epochs=3)
    assert "dying halfway through checkpoint write #2" in log
    assert [int(s) for s in RESUMED.findall(log)] == [2], log[-4000:]  # the first save, intact (rank 0 says it)
    assert not list(out.glob(".*.tmp")), "a torn temporary was left behind"


@pytest.mark.extended
def test_a_stopped_worker_is_timed_out_and_the_round_restarted(synthetic_data, tmp_path, out):
    """Node 1's worker is SIGSTOPped (alive, silent: a hung GPU, a stuck file system). Rank 0's next collective
    fails after --dist-timeout; its agent restarts the round, node 1's agent kills its stopped worker (torchrun
    sends SIGTERM, then SIGKILL after 30 s), and the job resumes and finishes instead of waiting forever."""
    hashes = tmp_path / "hashes"
    port = _free_port()
    nodes = [Node(rank, port, synthetic_data, out, "--epochs", "4", "--save-every", "2", "--dist-timeout", "8",
                  env={"FAULT_PARAM_HASH_DIR": str(hashes)}) for rank in (0, 1)]
    step = _first_checkpoint_step(out, nodes)
    stopped_at = time.monotonic()
    for pid in nodes[1].workers():
        os.kill(pid, signal.SIGSTOP)
    _finish_all(nodes, hashes, epochs=4)
    seconds, resumed_step = _recovery(nodes, stopped_at)
    assert resumed_step >= step
    print(f"recovery: {seconds:.1f}s from SIGSTOP to training again (resumed at step {resumed_step})")


@pytest.mark.extended
def test_a_restart_that_finds_a_checkpoint_of_another_world_size_keeps_its_place(synthetic_data, tmp_path, out):
    """A single process stops mid-epoch (step 2 of 5 batches of 8); the two-node job that picks up its last.pt
    continues from the same place in the epoch's sample order (2 batches x 1 process = 1 batch x 2 processes),
    says so, and ends with both ranks holding the same weights."""
    single = subprocess.run([sys.executable, str(FAULT_TRAIN), "--data", str(synthetic_data), "--out", str(out),
                             *TRAIN, "--epochs", "2", "--max-steps", "2", "--save-every", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    saved = load_checkpoint(out / "last.pt")
    assert (saved["world_size"], saved["step"], saved["train_state"]["batches_done"]) == (1, 2, 2)
    hashes = tmp_path / "hashes"
    port = _free_port()
    nodes = [Node(rank, port, synthetic_data, out, "--epochs", "2", env={"FAULT_PARAM_HASH_DIR": str(hashes)})
             for rank in (0, 1)]
    log = _finish_all(nodes, hashes, epochs=2)
    assert "processes: 1 (checkpoint) vs 2 (now)" in log
    assert "batch 2 of 1 process(es) = batch 1 of 2" in log, log[-4000:]
    assert load_checkpoint(out / "last.pt")["step"] == 2 + (3 - 1) + 3  # the rest of epoch 1, then all of epoch 2



@pytest.mark.extended
def test_a_replaced_node_joins_the_job_when_each_round_has_its_own_store(synthetic_data, tmp_path, out):
    """Node 1 dies whole (its agent and worker SIGKILLed) and a new agent takes its place. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every round publishes its master address, so the new agent joins the next
    round and the job resumes. (With torchrun's default shared store it cannot: the new agent waits for an address
    only the first round published, until the rendezvous read timeout ends the job; the workers warn about it.)"""
    hashes = tmp_path / "hashes"
    port = _free_port()
    env = {"FAULT_PARAM_HASH_DIR": str(hashes), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    nodes = [Node(rank, port, synthetic_data, out, "--epochs", "4", "--save-every", "2", env=env) for rank in (0, 1)]
    step = _first_checkpoint_step(out, nodes)
    replaced_at = time.monotonic()
    for pid in descendants(nodes[1].proc.pid):
        os.kill(pid, signal.SIGKILL)
    nodes[1].proc.wait()
    nodes[1] = Node(1, port, synthetic_data, out, "--epochs", "4", "--save-every", "2", env=env)
    log = _finish_all(nodes, hashes, epochs=4)
    seconds, resumed_step = _recovery(nodes, replaced_at)
    assert resumed_step >= step and "shared worker store" not in log
    print(f"recovery: {seconds:.1f}s from the node's death to training again (resumed at step {resumed_step})")
