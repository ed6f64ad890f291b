"""`python -m export.caption` over hostile inputs: one error line per bad file, every good one captioned, no
traceback, bounded memory; names that cannot forge output lines under any locale; figure writes that fail per file.

The folder (tests/support/image_folder.py) holds accepted photos in every mode, formats Pillow opens by content but
we refuse, decompression bombs of every PNG colour type and depth and of JPEG/BMP/TIFF/WebP, a 16-bit 9400x9400
image under the pixel limit, broken files, hostile names and special files (FIFO, devices, symlink loops).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from core.fileio import printable
from tests.support import corpus
from tests.support.image_folder import build, run_caption
from tests.support.memory import make_export

REPO = Path(__file__).resolve().parents[2]
PEAK_LIMIT_KIB = 1.5 * 2**20  # 1.5 GiB, the whole process (importing torch alone takes about 0.65 GiB here)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("caption_model"))


def _caption(model: Path, *args: str, env: dict | None = None, limit_fsize: int | None = None):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    cmd = [sys.executable, "-m", "export.caption", *args, "--model", str(model), "--beam-size", "2",
           "--max-decode-len", "4", "--threads", "1"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300, env={**os.environ, **(env or {})},
                          preexec_fn=limit if limit_fsize else None)


@pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")  # writing the IM sample
def test_a_folder_of_bad_and_odd_files_names_each_bad_one_once_and_captions_the_rest(model, tmp_path):
    folder = tmp_path / "inputs"
    c = build(folder)
    proc, peak_kib = run_caption(model, folder, c, save_dir=None)
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Warning" not in err, err[-3000:]
    lines = out.splitlines()
    captioned = [line.split("\t")[0] for line in lines]
    assert len(lines) == len(c.good) and all(line.count("\t") == 1 for line in lines), lines
    assert sorted(captioned) == sorted(printable(str(folder / n)) for n in c.good)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    bad = [printable(str(folder / n)) for n in c.bad] + c.extra_args
    assert len(errors) == len(bad), "\n".join(errors)
    for name in bad:
        assert sum(e.startswith(f"error: {name}: ") for e in errors) == 1, (name, errors)
    assert f"{len(c.good)} captioned, {len(bad)} failed" in err
    assert peak_kib < PEAK_LIMIT_KIB, f"peak RSS {peak_kib / 2**20:.2f} GiB"


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"},
                                 pytest.param({"LC_ALL": "C", "LANG": "C"}, marks=pytest.mark.slow),  # coerced to UTF-8
                                 {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}],
                         ids=["ascii-stdout", "C-locale", "C-locale-no-utf8-mode"])
def test_non_utf8_names_and_file_lists_work_under_any_stdout_encoding(model, tmp_path, env):
    folder = tmp_path / "in"
    folder.mkdir()
    jpg = corpus.jpeg()
    for name in (b"latin1_\xe9t\xe9.jpg", "café_写真.jpg".encode(), b"tab\there.jpg"):
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(jpg)
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"in/latin1_\xe9t\xe9.jpg\nin/caf\xc3\xa9_\xe5\x86\x99\xe7\x9c\x9f.jpg\nin/missing_\xff.jpg\n")
    proc = _caption(model, str(folder), "--file-list", str(listed), env=env)
    out, err = proc.stdout.decode("ascii", "replace"), proc.stderr.decode("ascii", "replace")
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert len(out.splitlines()) == 5 and all(line.count("\t") == 1 for line in out.splitlines()), out
    assert out.count("latin1_\\xe9t\\xe9.jpg\t") == 2 and "tab\\there.jpg\t" in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path}/in/missing_\\xff.jpg: no such image file"]


def test_figure_names_never_collide_and_long_names_are_shortened(model, tmp_path):
    folder, figures = tmp_path / "in", tmp_path / "figures"
    folder.mkdir()
    for name in ("a.jpg", "a_attention.png", "a.png", "x" * 251 + ".jpg"):
        (folder / name).write_bytes(corpus.jpeg(seed=len(name)))
    proc = _caption(model, str(folder), "--save-dir", str(figures), "--beam-size", "1")
    assert proc.returncode == 0, proc.stderr.decode()
    written = sorted(p.name for p in figures.iterdir())
    captioned = [n for n in written if not n.endswith("_attention.png")]
    assert len(captioned) == 4 and len(set(written)) == len(written)
    assert all(len(n.encode()) <= 255 for n in written)


def test_figure_write_failures_are_one_error_each_and_captioning_goes_on(model, tmp_path):
    folder, figures = tmp_path / "in", tmp_path / "figures"
    folder.mkdir()
    figures.mkdir()
    for k in range(3):
        (folder / f"img{k}.jpg").write_bytes(corpus.jpeg(seed=k))
    # A 4 KB file-size limit: every figure write fails (EFBIG, after the SIGXFSZ that would kill the process).
    proc = _caption(model, str(folder), "--save-dir", str(figures), limit_fsize=4096)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert len(out.splitlines()) == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all("could not write figures" in e and "File too large" in e for e in errors), errors
    assert not [p for p in figures.iterdir() if p.suffix == ".png"]  # no partial figure left behind


def test_a_pinned_manifest_hash_refuses_an_export_rewritten_with_consistent_hashes(model, tmp_path):
    """The manifest is integrity, not authenticity: a changed file with its manifest entry updated loads; pinning
    the manifest's sha256 (--expect-sha256) refuses it."""
    import json
    import shutil

    from export.manifest import MANIFEST, sha256_file

    image = tmp_path / "a.jpg"
    image.write_bytes(corpus.jpeg())
    pinned = sha256_file(model / MANIFEST)
    ok = _caption(model, str(image), "--expect-sha256", pinned.upper())
    assert ok.returncode == 0, ok.stderr.decode()
    forged = tmp_path / "forged"
    shutil.copytree(model, forged)
    vocab = json.loads((forged / "vocab.json").read_text())
    vocab["itos"][4:6] = vocab["itos"][5:3:-1]  # two words swapped: every caption now says something else
    (forged / "vocab.json").write_text(json.dumps(vocab))
    manifest = json.loads((forged / MANIFEST).read_text())
    manifest["files"]["vocab.json"].update(sha256=sha256_file(forged / "vocab.json"),
                                           bytes=(forged / "vocab.json").stat().st_size)
    (forged / MANIFEST).write_text(json.dumps(manifest))
    from export.manifest import ExportFormatError
    from export.runtime import load_backend

    load_backend("ort", forged, threads=1)  # loads: what the manifest's hashes alone cannot catch
    with pytest.raises(ExportFormatError, match="changed since its hash was recorded"):
        load_backend("eager", forged, expect_sha256=pinned)
    refused = _caption(forged, str(image), "--expect-sha256", pinned)
    err = refused.stderr.decode()
    assert refused.returncode == 2 and "Traceback" not in err and refused.stdout == b"", err
    assert f"{forged / MANIFEST}: sha256" in err and "changed since its hash was recorded" in err
    with pytest.raises(ExportFormatError, match="not 64 hexadecimal digits"):
        load_backend("ort", model, expect_sha256="abc")
