"""Single-node training listens on loopback only: the sockets of a real short launch, listed with ``ss -ltnp``.

``torchrun --standalone`` listens on every interface (its TCPStore server binds the wildcard address); the
launcher behind ``./launch.sh train`` and ``demo`` (distributed/localrun.py) binds the agent's stores to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import descendants

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list sockets")]




def _listening(pids: set[int]) -> set[str]:
    """Local addresses (host:port) of TCP sockets in LISTEN state owned by ``pids``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            found.add(line.split()[3])
    return found


def _listen_during(cmd: list[str], env: dict, seconds: float) -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening(descendants(proc.pid))
        time.sleep(0.2)
    out, err = proc.communicate(timeout=240)
    return seen, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host == "::1" or host.startswith("127.")


# A real distributed job, short: gloo process group, one all_reduce, a pause so that the sockets can be listed.
JOB = """
import time, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == dist.get_world_size()
time.sleep(2)
dist.barrier()
dist.destroy_process_group()
"""


def test_single_node_launch_listens_on_loopback_only(tmp_path):
    """The agent's two stores and the workers' gloo sockets (training under it: the slow test below)."""
    job = tmp_path / "job.py"
    job.write_text(JOB)
    cmd = [sys.executable, "-m", "distributed.localrun", "--nproc_per_node=2", str(job)]
    seen, r = _listen_during(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, seconds=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(seen) >= 2, f"expected the agent's stores at least, saw {sorted(seen)}"
    assert all(_is_loopback(a) for a in seen), f"listening beyond loopback: {sorted(seen)}"


@pytest.mark.slow  # the same check as above, through a real 2-process training (9-28 s on 2 shared cores)
@pytest.mark.extended
def test_training_under_the_loopback_launcher_listens_on_loopback_only(synthetic_data, tmp_path):
    cmd = [sys.executable, "-m", "distributed.localrun", "--nproc_per_node=2", "distributed/train.py",
           "--data", str(synthetic_data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--threads", "1",
           "--no-progress", "--epochs", "1", "--no-final-eval", "--val-max-images", "2"]
    seen, r = _listen_during(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, seconds=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(seen) >= 2 and all(_is_loopback(a) for a in seen), sorted(seen)
    assert "2 process(es)" in r.stdout


def test_launch_sh_uses_the_loopback_launcher_for_train_and_demo():
    text = (REPO / "launch.sh").read_text()
    assert "torchrun\" --standalone" not in text
    assert text.count("-m distributed.localrun") == 2


@pytest.mark.parametrize("flags", [["--rdzv-endpoint=0.0.0.0:29500", "--nproc_per_node=1"],
                                   ["--nproc_per_node", "1", "--standalone"]])  # a flag's value written apart
def test_rendezvous_flags_are_refused_by_the_loopback_launcher(flags):
    r = subprocess.run([sys.executable, "-m", "distributed.localrun", *flags, "x.py"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "is fixed here" in r.stderr and "Traceback" not in r.stderr
