"""Exported models and run-time inputs, tested from the outside (export/ is H4's code).

- a tampered / truncated / incomplete export directory, or one whose ONNX external data points outside it,
  is refused with a clear error (API and `python -m export.caption`);
- bad images, odd files in a folder and tensors of the wrong shape or dtype each get one clear error and the
  other inputs are still captioned;
- an export that cannot be written (path under a regular file, file size limit) fails clearly and leaves the
  previous export loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support import corpus

from export import runtime, to_onnx
from export.manifest import ExportFormatError

from core.checkpoint import make_checkpoint, save_checkpoint
from core.model import CaptionModel, ModelConfig
from core.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model (resnet18 at 32 px, 4 regions), its checkpoint and its export directory."""
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle", "a blue square above a red circle", "two small shapes"])
    cfg = ModelConfig(vocab_size=len(vocab), backbone="resnet18", encoded_size=2, image_size=32, attention_dim=16,
                      embed_dim=8, decoder_dim=16)
    model = CaptionModel(cfg).eval()
    base = tmp_path_factory.mktemp("export")
    ckpt = save_checkpoint(base / "tiny.pt", make_checkpoint(model, vocab))
    out = base / "exported"
    to_onnx.export_model(model, vocab, out, torchscript=False, num_calib=2)
    return out, ckpt


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(d: Path, *names: str) -> None:
    """Update the manifest hashes of ``names``, as someone who tampers with the whole directory would."""
    m = json.loads((d / "manifest.json").read_text())
    for n in names:
        data = (d / n).read_bytes()
        m["files"][n] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (d / "manifest.json").write_text(json.dumps(m))


def flip_middle_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def run_caption(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export.caption", *args, "--threads", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


# --------------------------------------------------------------------------------------------
# Export directories that must be refused
# --------------------------------------------------------------------------------------------
def _flip_encoder(d):
    flip_middle_byte(d / "encoder.onnx")


def _truncate_step(d):
    p = d / "decoder_step.onnx"
    p.write_bytes(p.read_bytes()[:1000])


def _delete_encoder(d):
    (d / "encoder.onnx").unlink()


def _edit_vocab(d):
    v = json.loads((d / "vocab.json").read_text())
    (d / "vocab.json").write_text(json.dumps(v).replace("circle", "sircle"))


def _garbage_manifest(d):
    (d / "manifest.json").write_text('{"format": "sat-export", "files": ')


def _manifest_escapes(d):
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (d / "manifest.json").write_text(json.dumps(m))


def _garbage_onnx_with_matching_hash(d):
    (d / "decoder_step.onnx").write_bytes(b"\x08\x07" + os.urandom(3000))
    rehash(d, "decoder_step.onnx")


def _no_manifest(d):
    (d / "manifest.json").unlink()


TAMPER = {  # name -> (edit, regex the error must match)
    "byte_flipped_in_encoder": (_flip_encoder, r"encoder\.onnx.*sha256.*does not match"),
    "truncated_step": (_truncate_step, r"decoder_step\.onnx.*sha256"),
    "encoder_deleted": (_delete_encoder, r"encoder\.onnx"),
    "vocab_edited": (_edit_vocab, r"vocab\.json.*sha256"),
    "manifest_not_json": (_garbage_manifest, r"manifest\.json.*not valid JSON"),
    "manifest_lists_a_path_outside": (_manifest_escapes, r"outside the export directory"),
    "garbage_onnx_with_rewritten_hash": (_garbage_onnx_with_matching_hash, r"decoder_step\.onnx"),
    "no_manifest": (_no_manifest, r"no manifest\.json"),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_export_is_refused_by_the_onnx_runtime(exported, tmp_path, case):
    edit, pattern = TAMPER[case]
    d = copy_export(exported[0], tmp_path / "exp")
    edit(d)
    with pytest.raises(ExportFormatError, match=pattern):
        runtime.OrtBackend(d, providers=["cpu"])


def test_torchscript_files_only_when_asked(exported):
    """Exported without --torchscript: no .ts files, and the torchscript backend says how to get them."""
    assert not list(exported[0].glob("*.ts"))
    with pytest.raises(ExportFormatError, match="export with --torchscript"):
        runtime.load_backend("torchscript", exported[0])


def test_tampered_safetensors_is_refused_by_the_eager_runtime(exported, tmp_path):
    d = copy_export(exported[0], tmp_path / "exp")
    flip_middle_byte(d / "model.safetensors")
    with pytest.raises(ExportFormatError, match=r"model\.safetensors.*sha256"):
        runtime.load_backend("eager", d)


def _external_data_export(src: Path, dst: Path, location: str, target: Path) -> Path:
    """decoder_step.onnx rewritten so its initializers live in an external file at ``location``."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    d = copy_export(src, dst)
    model = onnx.load(str(d / "decoder_step.onnx"))
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    onnx.save_model(model, str(d / "decoder_step.onnx"))  # writes d/weights.bin
    shutil.move(str(d / "weights.bin"), str(target))
    model = onnx.load(str(d / "decoder_step.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save_model(model, str(d / "decoder_step.onnx"))
    rehash(d, "decoder_step.onnx")
    return d


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_export_directory_is_refused(exported, tmp_path, how):
    outside = tmp_path / "outside.bin"
    if how == "symlink":
        d = _external_data_export(exported[0], tmp_path / "exp", "weights.bin", outside)
        (d / "weights.bin").symlink_to(outside)
        rehash(d, "weights.bin")
    else:
        d = _external_data_export(exported[0], tmp_path / "exp", "../outside.bin" if how == "dotdot" else str(outside),
                                  outside)
    with pytest.raises(ExportFormatError, match="outside the export directory"):
        runtime.OrtBackend(d, providers=["cpu"])


def test_external_data_inside_the_directory_but_unlisted_is_refused(exported, tmp_path):
    d = _external_data_export(exported[0], tmp_path / "exp", "weights.bin", tmp_path / "w.bin")
    shutil.move(str(tmp_path / "w.bin"), str(d / "weights.bin"))
    with pytest.raises(ExportFormatError, match="not listed in the manifest"):
        runtime.OrtBackend(d, providers=["cpu"])
    rehash(d, "weights.bin")  # listed with its hash: accepted
    assert runtime.OrtBackend(d, providers=["cpu"]).encode(torch.zeros(1, 3, 32, 32)).h.shape == (1, 16)


def test_caption_command_refuses_a_tampered_export_in_one_line(exported, tmp_path):
    d = copy_export(exported[0], tmp_path / "exp")
    flip_middle_byte(d / "encoder.onnx")
    img = tmp_path / "a.jpg"
    img.write_bytes(corpus.jpeg())
    proc = run_caption(str(img), "--model", str(d))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot load the model:") and "encoder.onnx" in proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------------
# Inputs at run time
# --------------------------------------------------------------------------------------------
def _bad_inputs(d: Path) -> tuple[list[Path], set[str]]:
    """Files to caption, and the names that must come back as errors."""
    good = {"ok.jpg": corpus.jpeg((48, 40)), "grey.png": corpus.png((40, 40), mode="L"),
            "one_pixel.png": corpus.png((1, 1)),
            "enormous_but_legal.jpg": corpus.encode(corpus.Image.new("RGB", (4000, 3000), (90, 140, 200)), "JPEG"),
            "cmyk.jpg": corpus.jpeg((40, 40), mode="CMYK")}
    bad = {"empty.jpg": b"", "truncated.jpg": corpus.truncated_jpeg(), "readme.jpg": corpus.text_named_jpg(),
           "bomb.png": corpus.png_bomb_header(), "corrupt.png": corpus.corrupt_png(),
           "animation.gif": corpus.gif()}  # GIF is not an accepted format (core.images.ACCEPTED_FORMATS)
    from core.images import to_rgb

    try:
        to_rgb(corpus.Image.new("La", (2, 2)))
        good["premultiplied.tif"] = corpus.tiff_premultiplied_grey_alpha()
    except ValueError:
        bad["premultiplied.tif"] = corpus.tiff_premultiplied_grey_alpha()
    d.mkdir(parents=True, exist_ok=True)
    for name, data in {**good, **bad}.items():
        (d / name).write_bytes(data)
    (d / "a_directory.jpg").mkdir()
    names = sorted({*good, *bad})
    paths = [d / n for n in names] + [d / "a_directory.jpg", d / "does_not_exist.jpg"]
    return paths, {*bad, "a_directory.jpg", "does_not_exist.jpg"}


@pytest.mark.parametrize("backend", ["ort", "eager"])
def test_each_bad_image_gets_one_error_and_the_others_are_captioned(exported, tmp_path, backend):
    be = runtime.load_backend(backend, exported[0] if backend == "ort" else exported[1], threads=1)
    captioner = runtime.Captioner(be, beam_size=2, max_len=6)
    paths, bad = _bad_inputs(tmp_path / "in")
    results = list(captioner.caption_paths(paths, batch_size=3))
    assert [r.path for r in results] == [str(p) for p in paths]  # one result per input, in order
    for r in results:
        name = Path(r.path).name
        if name in bad:
            assert not r.ok and name in r.error and "\n" not in r.error.strip(), (name, r.error)
        else:
            assert r.ok and isinstance(r.caption, str), (name, r.error)


BAD_TENSORS = {
    "wrong_size": lambda: torch.zeros(2, 3, 31, 32),
    "no_batch_dim": lambda: torch.zeros(3, 32, 32),
    "channels_last": lambda: torch.zeros(1, 32, 32, 3),
    "grey": lambda: torch.zeros(1, 1, 32, 32),
    "empty_batch": lambda: torch.zeros(0, 3, 32, 32),
    "float64": lambda: torch.zeros(1, 3, 32, 32, dtype=torch.float64),
    "uint8": lambda: torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
    "int64": lambda: torch.zeros(1, 3, 32, 32, dtype=torch.int64),
    "a_list": lambda: [[0.0] * 32] * 32,
    "none": lambda: None,
}


@pytest.mark.parametrize("backend", ["ort", "eager"])
def test_wrong_tensor_shapes_and_dtypes_are_one_clear_error(exported, backend):
    be = runtime.load_backend(backend, exported[0] if backend == "ort" else exported[1], threads=1)
    captioner = runtime.Captioner(be, beam_size=2, max_len=5)
    for name, make in BAD_TENSORS.items():
        with pytest.raises(ValueError, match=r"expected float32 images of shape \[N, 3, 32, 32\]"):
            captioner.caption_tensors(make())
    # The captioner still works afterwards; numpy input and non-finite pixels do not crash it.
    assert len(captioner.caption_tensors(np.zeros((2, 3, 32, 32), dtype=np.float32))) == 2
    weird = torch.zeros(2, 3, 32, 32)
    weird[0, 0, 0, 0], weird[1] = float("nan"), float("inf")
    assert len(captioner.caption_tensors(weird)) == 2


def test_caption_command_on_a_folder_with_mixed_content(exported, tmp_path):
    d = tmp_path / "folder"
    paths, bad = _bad_inputs(d)
    (d / "notes.txt").write_text("not an image\n")
    (d / ".hidden.jpg").write_bytes(corpus.text_named_jpg())
    (d / "subdir").mkdir()
    (d / "subdir" / "nested.jpg").write_bytes(corpus.jpeg())
    proc = run_caption(str(d), str(tmp_path / "does_not_exist.jpg"), "--model", str(exported[0]), "--beam-size", "2",
                       "--max-decode-len", "5", "--batch-size", "4")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    captioned = {Path(line.split("\t")[0]).name for line in proc.stdout.splitlines()}
    on_disk_bad = {n for n in bad if n not in ("a_directory.jpg", "does_not_exist.jpg")}
    expected_ok = {p.name for p in paths if p.is_file()} - on_disk_bad
    assert captioned == expected_ok  # notes.txt, .hidden.jpg, subdir/ and the a_directory.jpg dir are not inputs
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(on_disk_bad) + 1  # one line per bad file, plus the missing one
    for name in on_disk_bad | {"does_not_exist.jpg"}:
        assert sum(name in e for e in errors) == 1, (name, errors)


def test_caption_command_with_an_unwritable_save_dir_is_a_clear_error(exported, tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(corpus.jpeg())
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_caption(str(img), "--model", str(exported[0]), "--beam-size", "1", "--save-dir", str(blocker / "figs"))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "a_file" in proc.stderr


# --------------------------------------------------------------------------------------------
# Exports that cannot be written
# --------------------------------------------------------------------------------------------
def test_export_under_a_regular_file_is_a_clear_error(exported, tmp_path):
    from core.checkpoint import model_from_checkpoint

    model, vocab = model_from_checkpoint(exported[1])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(to_onnx.ExportError, match="a_file"):
        to_onnx.export_model(model, vocab, blocker / "exported", torchscript=False, num_calib=1)


def _limit_file_size():  # runs in the child before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_export_that_runs_out_of_space_leaves_the_previous_export_intact(exported, tmp_path):
    """RLIMIT_FSIZE makes every write past 1 MB fail with EFBIG, as a full disk fails with ENOSPC."""
    d = copy_export(exported[0], tmp_path / "exported")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    proc = subprocess.run([sys.executable, "export/to_onnx.py", "--checkpoint", str(exported[1]), "--out", str(d),
                           "--no-torchscript", "--calib-images", "1", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=_limit_file_size)
    assert proc.returncode != 0
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the previous export, byte for byte
    assert runtime.OrtBackend(d, providers=["cpu"]).encode(torch.zeros(1, 3, 32, 32)).h.shape == (1, 16)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")], "partial export left behind"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "File too large" in proc.stderr, proc.stderr[-3000:]
