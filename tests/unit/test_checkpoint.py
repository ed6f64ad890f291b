"""Checkpoints: round trip, atomic writes, safe loading, clear mismatch messages, safetensors."""

import pytest
import torch

from core.checkpoint import (
    CheckpointError,
    describe_mismatch,
    load_checkpoint,
    load_safetensors,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    save_safetensors,
)
from core.fileio import WriteError, atomic_write


@pytest.fixture(scope="module")
def trained(tiny_model):
    return tiny_model


def test_round_trip_rebuilds_the_same_model(tmp_path, trained):
    model, vocab = trained
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    path = save_checkpoint(tmp_path / "last.pt", make_checkpoint(model, vocab, optimizer=opt.state_dict(), epoch=3, history=[{"bleu4": 0.5}]))
    state = load_checkpoint(path)
    assert state["epoch"] == 3 and state["history"] == [{"bleu4": 0.5}]
    rebuilt, vocab2 = model_from_checkpoint(path)
    assert vocab2 == vocab and rebuilt.cfg == model.cfg
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model.encode(images), rebuilt.encode(images)):
            assert torch.equal(a, b)


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, trained):
    model, vocab = trained
    path = save_checkpoint(tmp_path / "last.pt", make_checkpoint(model, vocab, epoch=1))

    def crash_midway(f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # the process dies during the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_midway)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unwritable_directory_is_named(tmp_path, trained):
    model, vocab = trained
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(WriteError, match="cannot write .*last.pt"):
        save_checkpoint(blocker / "last.pt", make_checkpoint(model, vocab))


class WritesAFile:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickled_code_is_refused_and_never_runs(tmp_path, trained):
    model, vocab = trained
    target = tmp_path / "pwned"
    state = make_checkpoint(model, vocab)
    state["payload"] = WritesAFile(str(target))
    path = tmp_path / "evil.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not target.exists()


def test_truncated_and_foreign_files_are_named(tmp_path, trained):
    model, vocab = trained
    good = save_checkpoint(tmp_path / "good.pt", make_checkpoint(model, vocab))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a captioning checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_incompatible_weights_say_what_differs(tmp_path, trained):
    model, vocab = trained
    state = make_checkpoint(model, vocab)
    state["model_config"] = {**state["model_config"], "decoder_dim": 32}
    with pytest.raises(CheckpointError, match="another shape"):
        model_from_checkpoint(state)
    diff = describe_mismatch(model.cfg.to_dict(), {**model.cfg.to_dict(), "backbone": "resnet101"})
    assert diff == ["model config backbone: 'resnet18' (checkpoint) vs 'resnet101' (now)"]


def test_safetensors_round_trip(tmp_path, trained):
    model, vocab = trained
    save_safetensors(model, vocab, tmp_path / "weights")
    rebuilt, vocab2 = load_safetensors(tmp_path / "weights")
    assert vocab2 == vocab
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "weights" / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.json"):
        load_safetensors(tmp_path / "weights")


def test_tensor_files_are_not_read_with_a_torch_that_has_weights_only_bypasses(tmp_path, monkeypatch):
    from core import fileio

    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    assert fileio.load_weights_only(path)["a"].shape == (1,)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")
    with pytest.raises(RuntimeError, match="known bypasses.*torch >= 2.10"):
        fileio.load_weights_only(path)
    with pytest.raises(CheckpointError, match="^refusing to read .*known bypasses"):  # not "truncated or corrupt"
        load_checkpoint(path)
