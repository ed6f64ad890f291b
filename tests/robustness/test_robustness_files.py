"""Files we load: checkpoints (pickle payloads, incompatible configs) and safetensors (tampered, truncated),
and checkpoint writes that fail (full disk, file size limit): a clear error and the previous file intact.

Complements tests/unit/test_checkpoint.py (round trip, open() payload, ENOTDIR, truncated .pt).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_safetensors,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from core.model import CaptionModel, ModelConfig
from core.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red circle", "a blue square above a red circle", "two shapes"]


def tiny_cfg(vocab: Vocabulary, **kw) -> ModelConfig:
    base = dict(vocab_size=len(vocab), backbone="resnet18", encoded_size=2, image_size=32, attention_dim=16,
                embed_dim=8, decoder_dim=16)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vocab = Vocabulary.build(CAPTIONS)
    return CaptionModel(tiny_cfg(vocab)).eval(), vocab


class RunsAShellCommand:
    """A pickle payload: unpickling it runs ``touch TARGET`` through os.system."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["top_level", "nested_in_optimizer_state", "legacy_tar_format"])
def test_pickle_payload_calling_os_system_never_runs(tmp_path, tiny, where):
    model, vocab = tiny
    target = tmp_path / "pwned"
    state = make_checkpoint(model, vocab, epoch=1)
    if where == "nested_in_optimizer_state":
        state["optimizer"] = {"state": {0: {"step": RunsAShellCommand(target)}}, "param_groups": []}
    else:
        state["payload"] = RunsAShellCommand(target)
    path = tmp_path / "evil.pt"
    torch.save(state, path, _use_new_zipfile_serialization=where != "legacy_tar_format")
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        model_from_checkpoint(path)
    assert not target.exists()


def test_payload_is_refused_by_the_eager_runtime_too(tmp_path, tiny):
    """`--backend eager` with a checkpoint goes through core.checkpoint, so the payload never runs."""
    from export import runtime
    model, vocab = tiny
    target = tmp_path / "pwned"
    state = make_checkpoint(model, vocab)
    state["payload"] = RunsAShellCommand(target)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        runtime.load_backend("eager", tmp_path / "evil.pt")
    assert not target.exists()


def test_checkpoint_with_another_vocabulary_says_so(tiny):
    model, vocab = tiny
    state = make_checkpoint(model, vocab)
    state["vocab"] = Vocabulary.build(CAPTIONS + ["a green triangle"]).to_dict()
    with pytest.raises(CheckpointError, match=f"vocabulary has {len(vocab) + 2} words but the model expects {len(vocab)}"):
        model_from_checkpoint(state)


def test_checkpoint_with_another_backbone_says_which_tensors_differ(tiny):
    model, vocab = tiny
    state = make_checkpoint(model, vocab)
    state["model_config"] = {**state["model_config"], "backbone": "resnet34"}  # weights are resnet18's
    with pytest.raises(CheckpointError, match=r"does not fit this model config: \d+ missing \(e\.g\. \['encoder\."):
        model_from_checkpoint(state)


def test_checkpoint_of_another_format_version_says_which(tmp_path, tiny):
    model, vocab = tiny
    path = save_checkpoint(tmp_path / "future.pt", {**make_checkpoint(model, vocab), "format_version": 99})
    with pytest.raises(CheckpointError, match="format 99; this version reads format 1"):
        load_checkpoint(path)


@pytest.mark.parametrize("change", [{"backbone": "vgg16"}, {"unknown_key": 1}])
def test_checkpoint_with_a_malformed_config_names_the_file(tmp_path, tiny, change):
    model, vocab = tiny
    state = make_checkpoint(model, vocab)
    state["model_config"] = {**state["model_config"], **change}
    path = save_checkpoint(tmp_path / "odd_config.pt", state)
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(path)
    assert "odd_config.pt" in str(info.value) and next(iter(change)) in str(info.value)


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 1000, b"PK\x03\x04" + os.urandom(200), b"<html>404</html>"])
def test_garbage_checkpoint_is_named(tmp_path, garbage):
    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# safetensors + model.json
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, vocab = tiny
    d = tmp_path_factory.mktemp("safetensors")
    save_safetensors(model, vocab, d)
    return d


def tampered_copy(saved: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    (d / "model.json").write_bytes((saved / "model.json").read_bytes())
    (d / "model.safetensors").write_bytes(edit((saved / "model.safetensors").read_bytes()))
    return d


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def _with_header(data: bytes, header: dict) -> bytes:
    n, _ = _header(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _shape_lie(data: bytes) -> bytes:
    _, header = _header(data)
    key = next(k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2)
    header[key]["shape"] = [header[key]["shape"][0] * 2, header[key]["shape"][1]]
    return _with_header(data, header)


def _offsets_past_the_end(data: bytes) -> bytes:
    _, header = _header(data)
    key = next(k for k in header if k != "__metadata__")
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin, end + 10 ** 12]
    return _with_header(data, header)


SAFETENSORS_DAMAGE = {
    "truncated": lambda d: d[: len(d) // 2],
    "empty": lambda d: b"",
    "header_claims_16_EiB": lambda d: struct.pack("<Q", 2 ** 63) + d[8:],
    "header_not_json": lambda d: d[:8] + b"{" * 16 + d[24:],
    "shape_does_not_match_bytes": _shape_lie,
    "offsets_past_the_end": _offsets_past_the_end,
    "an_html_page": lambda d: b"<html><body>403 Forbidden</body></html>",
}


@pytest.mark.parametrize("damage", sorted(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_is_a_clear_error(saved, tmp_path, damage):
    d = tampered_copy(saved, tmp_path, SAFETENSORS_DAMAGE[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_safetensors(d)


def test_safetensors_with_weights_of_another_model_says_what_differs(tiny, tmp_path):
    model, vocab = tiny
    other = CaptionModel(tiny_cfg(vocab, decoder_dim=24))
    save_safetensors(other, vocab, tmp_path / "w")
    (tmp_path / "w" / "model.json").write_text(json.dumps(
        {"format_version": 1, "model_config": model.cfg.to_dict(), "vocab": vocab.to_dict()}))
    with pytest.raises(CheckpointError, match=r"does not fit this model config: .*another shape.*decoder"):
        load_safetensors(tmp_path / "w")


@pytest.mark.parametrize("meta", ['{"model_config": {}}', "[]", '{"vocab": {}, "model_config": {"vocab_size": "x"}}',
                                  "\ufeff{", ""])
def test_malformed_model_json_is_a_clear_error(saved, tmp_path, meta):
    d = tampered_copy(saved, tmp_path, lambda b: b)
    (d / "model.json").write_text(meta)
    with pytest.raises(CheckpointError, match=r"model\.json"):
        load_safetensors(d)


# --------------------------------------------------------------------------------------------
# A write that fails half way (disk full / file size limit): clear error, previous checkpoint intact
# --------------------------------------------------------------------------------------------
_FSIZE_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    import torch
    from core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    try:
        from core.fileio import WriteError
    except ImportError:
        WriteError = CheckpointError

    out = sys.argv[1]
    state = {"format_version": 1, "model_config": {}, "model": {"w": torch.randn(100_000)}, "epoch": 1}
    save_checkpoint(out + "/last.pt", state)
    # From here on, no file may grow beyond 64 kB: writes fail with EFBIG, like a full disk (ENOSPC).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, resource.RLIM_INFINITY))
    state["epoch"] = 2
    try:
        save_checkpoint(out + "/last.pt", state)
    except (CheckpointError, WriteError) as e:
        print("CLEAR:", e)
    except Exception as e:
        print("OTHER", type(e).__name__, e)
    else:
        print("NO ERROR")
""")


def test_checkpoint_write_beyond_the_file_size_limit_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    # The previous checkpoint is intact and no temporary file is left, whatever the message says.
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert proc.stdout.startswith("CLEAR: cannot write"), proc.stdout
    assert "last.pt" in proc.stdout and "previous file is unchanged" in proc.stdout
