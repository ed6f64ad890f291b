"""`python -m core.evaluate` against what broke it: a METEOR JVM that dies (it hung forever), Java tools that stop
answering, and results files that gave tracebacks (a lone surrogate, which also left a temporary file on every run;
JSON nested 100,000 deep; a 1 MB image_id echoed whole; a 1 MB caption that kills METEOR's JVM). Each ends with one
line, fast, leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core.cocoeval import JavaProcess, JavaToolError, package_dir, ptb_tokenize
from core.evaluate import MAX_CAPTION_CHARS, main
from core.synthetic import generate
from tests.support.processes import descendants
from tests.support.time_limit import time_limit

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("pycocoevalcap.bleu.bleu")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("evaluate") / "data", 10, seed=4, size=32)


@pytest.fixture
def results(data, tmp_path) -> Path:
    """Perfect captions for the test split."""
    from core.data import load_dataset

    d = load_dataset(data)
    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": n, "caption": d.captions[n][0]} for n in d.splits.test]))
    return path


@pytest.fixture
def empty_tmpdir(tmp_path, monkeypatch) -> Path:
    """The temporary directory of this process (and of its children), empty: what a run leaves there shows."""
    tmp = tmp_path / "TMPDIR"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


@needs_java
def test_a_killed_meteor_jvm_ends_evaluate_with_one_line(results, data):
    """The JVM that runs METEOR is killed as soon as it appears: the command ends within 30 s (it used to wait
    forever), the other metrics printed, METEOR's failure said in one line, exit 1."""
    p = subprocess.Popen([sys.executable, "-m", "core.evaluate", str(results), "--data", str(data), "--no-spice"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        killed, deadline = None, time.monotonic() + 120
        while killed is None and p.poll() is None and time.monotonic() < deadline:
            for pid in descendants(p.pid) - {p.pid}:  # only this test's own processes
                try:
                    if b"meteor-1.5.jar" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
                        killed = time.monotonic()
                except (OSError, ProcessLookupError):
                    continue
            time.sleep(0.05)
        assert killed is not None, "METEOR's JVM never started"
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 1, err
    assert err == "error: METEOR failed: the Java process ended (killed by signal 9)\n", err
    assert "METEOR   unavailable: METEOR failed" in out and "BLEU-4   1.0000" in out and "CIDEr-D" in out


@pytest.mark.parametrize("reads", [True, False], ids=["never_answers", "never_reads"])
def test_a_tool_that_stops_answering_or_reading_is_cut_at_the_deadline(reads):
    """The exchange machinery every Java tool goes through, on real processes that hang: one reads its stdin and
    never answers (sh keeps stdout open; cat ends when its stdin is closed), the other never reads (a 1 MB request
    fills the pipe). Each exchange ends at its deadline, and the process is killed."""
    proc = JavaProcess(["sh", "-c", "cat >/dev/null" if reads else "exec sleep 60"], Path("/"))
    try:
        t0 = time.monotonic()
        with time_limit(10), pytest.raises(JavaToolError, match=r"no answer within 0.5 s"):
            proc.ask("x" * (1 << 20), 1, timeout_s=0.5)
        assert time.monotonic() - t0 < 5
    finally:
        proc.close()
    assert proc.proc.returncode is not None  # killed, not left behind


def test_a_tool_that_dies_is_named_with_its_last_words():
    proc = JavaProcess(["sh", "-c", "read line; echo 'java.lang.OutOfMemoryError: Java heap space' >&2; exit 3"],
                       Path("/"))
    try:
        with time_limit(10), pytest.raises(JavaToolError) as died:
            proc.ask("SCORE ||| a ||| b", 1, timeout_s=5)
    finally:
        proc.close()
    assert str(died.value) == "the Java process ended (exit status 3): java.lang.OutOfMemoryError: Java heap space"


@needs_java
def test_the_ptb_tokenizer_takes_a_lone_surrogate_and_leaves_no_temporary_file(empty_tmpdir):
    with time_limit(60):
        out = ptb_tokenize({1: ["A dog\ud800 runs."], 2: ["two cats"]}, shutil.which("java"), package_dir())
    assert out[2] == ["two cats"] and out[1][0].startswith("a dog")
    assert list(empty_tmpdir.iterdir()) == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_RESULTS = {
    "lone_surrogate_caption": ('[{"image_id": "00001.jpg", "caption": "a dog \\ud800 runs"}]', "a lone surrogate"),
    "nested_100000_deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "image_id_of_1_mb": (json.dumps([{"image_id": "7" * (1 << 20), "caption": "a dog"}]), "(1048576 characters)"),
    "caption_of_1_mb": (json.dumps([{"image_id": "00001.jpg", "caption": "dog " * (1 << 18)}]),
                        f"1048576 characters, over the bound of {MAX_CAPTION_CHARS} (--max-caption-chars)"),
    "image_id_a_list": (json.dumps([{"image_id": [[1]], "caption": "a dog"}]), "expected a name or a number"),
    "integer_of_5000_digits": ('[{"image_id": ' + "1" * 5000 + ', "caption": "a dog"}]', "not valid JSON"),
}


@pytest.mark.parametrize("fault", sorted(BAD_RESULTS))
def test_a_bad_results_file_is_one_short_line_and_leaves_nothing(fault, data, tmp_path, empty_tmpdir, capsys):
    text, expected = BAD_RESULTS[fault]
    path = _write(tmp_path / "results.json", text)
    with time_limit(60):
        assert main([str(path), "--data", str(data), "--no-spice"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and err.count("\n") == 1 and len(err) < 500, err[:1000]
    assert expected in err
    assert list(empty_tmpdir.iterdir()) == []
