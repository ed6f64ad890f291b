"""The whole toolkit from the outside: training outputs that cannot be written, and the demo pipeline
(generate -> check -> train -> export -> caption) with the network unreachable, proving nothing tries to download.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "distributed" / "train.py"
TINY_TRAIN = ["--preset", "tiny", "--no-final-eval", "--no-progress", "--loader", "torch", "--workers", "0",
              "--threads", "1", "--val-max-images", "4"]



def run(args: list[str], env: dict | None = None, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def synth(d: Path, n: int = 24, size: int = 64) -> Path:
    from core.synthetic import generate

    return generate(d, n, seed=1, size=size)


# --------------------------------------------------------------------------------------------
# Training outputs that cannot be written
# --------------------------------------------------------------------------------------------
def test_train_with_out_under_a_regular_file_is_a_clear_error(tmp_path):
    data = synth(tmp_path / "data", n=8)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run([str(TRAIN), "--data", str(data), "--out", str(blocker / "run"), *TINY_TRAIN, "--max-steps", "1"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error" in proc.stderr and "a_file" in proc.stderr
    assert blocker.read_text() == "x"


def _limit_file_size():  # in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_train_checkpoint_write_failure_is_clear_and_keeps_the_earlier_checkpoint(tmp_path):
    """A second run resumes, trains, and cannot write its checkpoint (writes past 5 MB fail with EFBIG)."""
    from core.checkpoint import load_checkpoint

    data, out = synth(tmp_path / "data"), tmp_path / "run"
    first = run([str(TRAIN), "--data", str(data), "--out", str(out), *TINY_TRAIN, "--max-steps", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: (out / p).read_bytes() for p in ("last.pt", "best.pt")}
    step = load_checkpoint(out / "last.pt")["train_state"]["step"]
    proc = run([str(TRAIN), "--data", str(data), "--out", str(out), *TINY_TRAIN, "--max-steps", "3"],
               preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    for name, content in before.items():  # the earlier checkpoints, byte for byte, and still loadable
        assert (out / name).read_bytes() == content, name
    assert load_checkpoint(out / "last.pt")["train_state"]["step"] == step
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"
    assert "Traceback" not in proc.stderr and "error" in proc.stderr, proc.stderr[-3000:]
    assert "last.pt" in proc.stderr or "best.pt" in proc.stderr


# --------------------------------------------------------------------------------------------
# Bad images in the training data: the skip list from `core.data check` keeps them out
# --------------------------------------------------------------------------------------------
def _dataset_with_a_truncated_train_image(d: Path) -> tuple[Path, str]:
    from tests.support import corpus
    from core.data import load_dataset

    data = synth(d)
    name = load_dataset(data).splits.train[0]  # the split does not depend on the file contents
    (data / "Images" / name).write_bytes(corpus.truncated_jpeg())
    return data, name


def test_train_skips_the_images_on_the_skip_list(tmp_path):
    from core.datacheck import check_dataset, write_skip_list

    data, bad = _dataset_with_a_truncated_train_image(tmp_path / "data")
    report = check_dataset(data)
    assert report.skip == [bad]
    write_skip_list(report, data / "skip_list.json")
    proc = run([str(TRAIN), "--data", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--max-steps", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip" in (proc.stdout + proc.stderr).lower()


@pytest.mark.slow
def test_train_without_a_skip_list_names_the_bad_image_and_the_check_command(tmp_path):
    data, bad = _dataset_with_a_truncated_train_image(tmp_path / "data")
    proc = run([str(TRAIN), "--data", str(data), "--out", str(tmp_path / "run"), *TINY_TRAIN, "--max-steps", "3"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert bad in proc.stderr and "core.data check" in proc.stderr


# --------------------------------------------------------------------------------------------
# Offline: nothing may try to reach the network
# --------------------------------------------------------------------------------------------
GUARD = textwrap.dedent('''
    """Test network guard (written by tests/robustness/test_robustness_pipeline.py): any attempt to reach a non-loopback
    address, to resolve a non-local name, or to use the dead proxy at 127.0.0.1:9 is logged and refused."""
    import os, socket, traceback

    _LOG = os.environ["SAT_NET_LOG"]
    _LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname(), "", None}


    def _record(what):
        with open(_LOG, "a") as f:
            f.write(f"pid {os.getpid()}: {what}\\n" + "".join(traceback.format_stack(limit=12)) + "---\\n")


    def _is_local_ip(host):
        return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "0.0.0.0", "::"))


    def _check(addr, family):
        if family == socket.AF_UNIX or not isinstance(addr, tuple):
            return
        host, port = addr[0], addr[1]
        if port == 9 or not (_is_local_ip(host) or host in _LOCAL_NAMES):
            _record(f"connect {host}:{port}")
            raise OSError(101, f"network access blocked by the test guard: {host}:{port}")


    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


    def connect(self, addr):
        _check(addr, self.family)
        return _connect(self, addr)


    def connect_ex(self, addr):
        _check(addr, self.family)
        return _connect_ex(self, addr)


    def getaddrinfo(host, *args, **kw):
        h = host.decode() if isinstance(host, bytes) else host
        if not (h in _LOCAL_NAMES or _is_local_ip(h)):
            _record(f"resolve {h}")
            raise socket.gaierror(socket.EAI_NONAME, f"name resolution blocked by the test guard: {h}")
        return _getaddrinfo(host, *args, **kw)


    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
''')


def test_network_guard_catches_attempts(tmp_path):
    """The guard itself works: a download attempt through urllib is refused and logged."""
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {"PYTHONPATH": f"{tmp_path / 'guard'}{os.pathsep}{ROOT}", "SAT_NET_LOG": str(log),
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    code = ("import urllib.request, socket\n"
            "for url in ('https://download.pytorch.org/models/resnet18.pth', 'http://example.com/'):\n"
            "    try: urllib.request.urlopen(url, timeout=5)\n"
            "    except Exception as e: print(type(e).__name__)\n"
            "socket.create_connection(('127.0.0.1', 1), timeout=1) if False else None\n")
    proc = run(["-c", code], env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    attempts = log.read_text().count("---\n")
    assert attempts == 2, log.read_text()


@pytest.mark.slow
def test_demo_pipeline_runs_offline_and_never_touches_the_network(tmp_path):
    """generate -> check -> train (1 process, tiny) -> export -> caption, every step under the network guard."""
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {"PYTHONPATH": f"{tmp_path / 'guard'}{os.pathsep}{ROOT}", "SAT_NET_LOG": str(log),
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": "",
           "TORCH_HOME": str(tmp_path / "torch_home"), "HF_HOME": str(tmp_path / "hf_home")}
    data, runs, exported = tmp_path / "data", tmp_path / "run", tmp_path / "exported"
    steps = [
        ["-m", "core.synthetic", str(data), "--images", "24", "--seed", "1", "--size", "64"],
        ["-m", "core.datacheck", str(data)],
        [str(TRAIN), "--data", str(data), "--out", str(runs), *TINY_TRAIN, "--max-steps", "2"],
        [str(ROOT / "export" / "to_onnx.py"), "--checkpoint", str(runs / "best.pt"), "--out", str(exported),
         "--no-torchscript", "--calib-images", "2", "--threads", "1"],
        ["-m", "export.caption", "--model", str(exported), "--backend", "ort", "--beam-size", "2", "--split", "test",
         "--limit", "2", "--data", str(data), "--save-dir", str(tmp_path / "captioned"), "--threads", "1"],
    ]
    for args in steps:
        proc = run(args, env=env, timeout=400)
        assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stderr[-3000:]}"
    assert len(list((tmp_path / "captioned").glob("*.png"))) >= 2
    assert not log.exists(), f"network attempts:\n{log.read_text()[:5000]}"
