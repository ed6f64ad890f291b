"""python -m export.batch_caption on a real two-node Ray cluster on this machine (head + a second node, 1 CPU each).

One cluster for the module (Ray's start is the slow part). The first job has bad files among its inputs and one of
its captioning actors is killed (SIGKILL) while it runs: the output still holds exactly one row per input, the
captions are the caption command's Captioner's, and both nodes captioned. The rerun resumes: only new files run.
Every Ray process the module starts is stopped at its end, and its temp dir removed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from tests.support.export_artifacts import PYTHON, ROOT, artifacts
from tests.support.processes import descendants

from export.runtime.batch.command import LOOPBACK

if importlib.util.find_spec("ray") is None:  # not imported here: LOOPBACK must be set before Ray's first import
    pytest.skip("the [scale] extra (ray[data]) is not installed", allow_module_level=True)

ACTOR_TITLE = b"MapBatches(CaptionActor)"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, 1 CPU each, loopback node addresses, in a short private temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="sat-ray-test-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_TMPDIR", *LOOPBACK)}
    os.environ.update(LOOPBACK)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)  # workers: this checkout
    os.environ["RAY_TMPDIR"] = temp_dir  # Ray's address file too (default /tmp/ray)
    os.makedirs(os.path.join(temp_dir, "ray"))
    from ray.cluster_utils import Cluster

    args = dict(num_cpus=1, object_store_memory=100 * 2**20, node_ip_address="127.0.0.1",
                temp_dir=os.path.join(temp_dir, "ray"))
    c = Cluster(initialize_head=True, head_node_args=dict(args, include_dashboard=False))
    try:
        c.add_node(**args)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()
        stop_ray_children()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stop_ray_children(wait_s: float = 15) -> None:
    """Ray's workers leave a moment after their raylet: wait for every Ray process below this one, then kill any left."""
    def ray_children() -> set[int]:
        out = set()
        for pid in descendants(os.getpid()) - {os.getpid()}:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"ray" in cmd and state != "Z":
                out.add(pid)
        return out

    end = time.monotonic() + wait_s
    while ray_children() and time.monotonic() < end:
        time.sleep(0.2)
    for pid in ray_children():
        os.kill(pid, signal.SIGKILL)


def command(cluster, inputs, out, *extra):
    return [PYTHON, "-m", "export.batch_caption", *map(str, inputs), "--out", str(out), "--address", cluster.address,
            "--progress-every", "0", *map(str, extra)]


def rows_of(out: Path) -> list[dict]:
    from export.runtime.batch.output import read_rows
    from pyarrow.fs import LocalFileSystem

    return read_rows(LocalFileSystem(), str(out))


def actor_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if ACTOR_TITLE in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def kill_an_actor_mid_run(proc: subprocess.Popen, log: Path, deadline_s: float = 120) -> int:
    """SIGKILL one captioning actor once the first results are written and the job is still running."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        if "first results" in log.read_text(errors="replace") and actor_pids():
            pid = actor_pids()[0]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no actor to kill before the job ended:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def images(art, tmp_path_factory):
    """160 good images (the export's synthetic ones under several names) + a junk .jpg and an empty .png."""
    folder = tmp_path_factory.mktemp("batch_in")
    sources = sorted(art.data_dir.glob("Images/*.jpg"))
    for k in range(4):
        for src in sources:
            shutil.copy(src, folder / f"{k}_{src.name}")
    (folder / "junk.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_two_nodes_bad_images_and_a_killed_actor_give_one_row_per_input(art, cluster, images, tmp_path):
    from export.runtime import Captioner, load_backend

    out, log = tmp_path / "out", tmp_path / "job.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(command(cluster, [images], out, "--model", art.export_dir, "--batch-size", 2,
                                        "--beam-size", 8, "--shard-rows", 40, "--precision", "fp32"),
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            killed = kill_an_actor_mid_run(proc, log)
            assert proc.wait(timeout=240) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert killed not in actor_pids()
    rows = rows_of(out)
    files = sorted(str(p) for p in images.iterdir())
    assert sorted(r["path"] for r in rows) == files  # exactly one row per input: none lost, none twice
    bad = {r["path"]: r["error"] for r in rows if r["error"]}
    assert sorted(bad) == [str(images / "empty.png"), str(images / "junk.jpg")]
    assert "zero bytes" in bad[str(images / "empty.png")] and "not an image" in bad[str(images / "junk.jpg")]
    captioner = Captioner(load_backend("ort", art.export_dir, threads=1), beam_size=8)
    good = [f for f in files if f not in bad]
    expected = {r.path: r.caption for r in captioner.caption_paths(good, batch_size=8)}
    assert {r["path"]: r["caption"] for r in rows if not r["error"]} == expected
    assert len({r["model_sha256"] for r in rows}) == 1 and all(r["tokens"] for r in rows if not r["error"])
    by_node = [line for line in log.read_text().splitlines() if "rows by node" in line][-1]
    assert by_node.split("rows by node: ")[1].count(",") == 1, by_node  # two nodes captioned


def test_rerun_resumes_and_writes_only_new_images(art, cluster, images, tmp_path):
    """Half the images were captioned by an earlier run (a finished shard); the rerun writes the rest, once."""
    out = tmp_path / "out"
    from export.runtime.batch.output import ShardWriter
    from export.manifest import MANIFEST, sha256_file
    from pyarrow.fs import LocalFileSystem

    files = sorted(str(p) for p in images.iterdir())
    sha = sha256_file(art.export_dir / MANIFEST)
    with ShardWriter(LocalFileSystem(), str(out), "jsonl") as w:  # an earlier run's rows, other captions
        w.write([{"path": f, "caption": "earlier", "model_sha256": sha} for f in files[::2]])
        w.commit()
        w.pending.append({"path": files[1], "caption": "never committed", "model_sha256": sha})
        w.pending.clear()  # a shard being filled when a job is killed never appears
    proc = subprocess.run(command(cluster, [images], out, "--model", art.export_dir, "--format", "jsonl",
                                  "--precision", "fp32"), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(files)} input images, {len(files[::2])} already in" in proc.stderr
    rows = rows_of(out)
    assert sorted(r["path"] for r in rows) == files
    assert {r["path"] for r in rows if r["caption"] == "earlier"} == set(files[::2])
