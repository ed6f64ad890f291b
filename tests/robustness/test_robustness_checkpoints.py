"""Checkpoints with non-finite weights or tensors that do not fit: refused at load by resume (which falls back to
the newest good checkpoint), export (before any work, no directory left) and the runtime; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointError, load_checkpoint, make_checkpoint, save_checkpoint, save_safetensors
from distributed.resume import Checkpointer, tensors_fit
from distributed.env import DistEnv

REPO = Path(__file__).resolve().parents[2]
SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), is_main=True)


def _save(path: Path, model, vocab, step: int, damage=None) -> Path:
    state = make_checkpoint(model, vocab, step=step)
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    if damage:
        damage(state["model"])
    save_checkpoint(path, state)
    os.utime(path, (1e9 + step, 1e9 + step))  # the mtime order the test means, whatever the clock does
    return path


def _nan(weights: dict) -> None:
    weights["decoder.fc.weight"][0, 0] = float("nan")


def _inf(weights: dict) -> None:
    weights["decoder.init_h.bias"][:] = float("inf")


def _reshaped(weights: dict) -> None:
    weights["decoder.fc.weight"] = weights["decoder.fc.weight"][:, :-1].contiguous()


def _missing(weights: dict) -> None:
    del weights["decoder.f_beta.bias"]


@pytest.mark.parametrize("damage, says", [(_nan, "non-finite"), (_inf, "non-finite"),
                                          (_reshaped, "do not fit"), (_missing, "do not fit")])
def test_resume_skips_a_damaged_last_pt_for_the_newest_good_checkpoint(tiny_model, tmp_path, damage, says, caplog):
    model, vocab = tiny_model
    best = _save(tmp_path / "best.pt", model, vocab, step=4)
    _save(tmp_path / "last.pt", model, vocab, step=6, damage=damage)  # newer and further along, but damaged
    found = Checkpointer(tmp_path, SINGLE).find("auto", fits=tensors_fit(model, model.cfg))
    assert found == best
    assert f"skipping {tmp_path / 'last.pt'}" in caplog.text and says in caplog.text


def test_another_model_config_is_not_skipped_but_stopped_on(tiny_model, tiny_model_config, tmp_path):
    """A changed flag is the user's decision to make (check_compatible names it); it must not silently restart."""
    model, vocab = tiny_model
    _save(tmp_path / "last.pt", model, vocab, step=6)
    other = type(model)(tiny_model_config(len(vocab), decoder_dim=24))
    assert Checkpointer(tmp_path, SINGLE).find("auto", fits=tensors_fit(other, other.cfg)) == tmp_path / "last.pt"


@pytest.mark.parametrize("damage", [_nan, _inf])
def test_non_finite_weights_are_refused_by_the_checkpoint_loader(tiny_model, tmp_path, damage):
    model, vocab = tiny_model
    path = _save(tmp_path / "diverged.pt", model, vocab, step=1, damage=damage)
    with pytest.raises(CheckpointError, match=r"diverged\.pt holds non-finite weights \(NaN or inf in 1 tensors"):
        load_checkpoint(path)


def test_the_runtime_refuses_non_finite_weights_in_a_checkpoint_and_in_safetensors(tiny_model, tmp_path):
    from export.runtime import load_backend

    model, vocab = tiny_model
    with pytest.raises(CheckpointError, match="non-finite"):
        load_backend("eager", _save(tmp_path / "nan.pt", model, vocab, step=1, damage=_nan))
    bad = type(model)(model.cfg)
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.decoder.fc.bias[3] = float("inf")
    save_safetensors(bad, vocab, tmp_path / "exported")
    with pytest.raises(CheckpointError, match=r"model\.safetensors holds non-finite weights"):
        load_backend("eager", tmp_path / "exported")


def test_export_refuses_before_any_work_and_leaves_no_directory(tiny_model, tmp_path):
    model, vocab = tiny_model
    ckpt = _save(tmp_path / "nan.pt", model, vocab, step=1, damage=_nan)
    out = tmp_path / "nested" / "exported"
    r = subprocess.run([sys.executable, "export/to_onnx.py", "--checkpoint", str(ckpt), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{ckpt} holds non-finite weights" in r.stderr
    assert not out.exists() and not out.parent.exists()


# The shape case is proven in-process above; its real run adds 11 s for the same code path: slow.
@pytest.mark.parametrize("damage", [pytest.param(_nan, marks=pytest.mark.extended), pytest.param(_reshaped, marks=pytest.mark.slow)])
def test_training_resumes_from_best_pt_when_last_pt_is_damaged(run_train, tmp_path, damage):
    out = tmp_path / "run"
    r = run_train(out, "--epochs", "1", "--no-final-eval", "--val-max-images", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    state = load_checkpoint(out / "last.pt")
    damage(state["model"])
    save_checkpoint(out / "last.pt", state)  # now the newest file
    r = run_train(out, "--epochs", "2", "--no-final-eval", "--val-max-images", "2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"skipping {out / 'last.pt'}" in r.stderr + r.stdout
    assert f"resumed from {out / 'best.pt'}" in r.stdout
