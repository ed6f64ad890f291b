"""Checkpoints: one dict of tensors and plain values, written atomically, read with ``weights_only=True``.

Layout (FORMAT_VERSION 1):
    format_version, model_config (dict), vocab (dict), model (state_dict),
    and whatever training state the trainer adds (optimizer, scaler, scheduler, epoch, step, rng, history, ...).

Inference weights can also be stored as ``model.safetensors`` + ``model.json`` (config and vocabulary): no
pickle at all.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.fileio import UnsafeTorchError, atomic_write, atomic_write_text, load_weights_only
from core.model import CaptionModel, ModelConfig
from core.vocab import Vocabulary

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely. Refuses pickled code, names the file on every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_weights_only(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects beyond tensors and plain values "
            f"(possibly code that would run on load). Only weights_only checkpoints are accepted. ({e})"
        ) from e
    except UnsafeTorchError as e:  # the file may be fine: the torch release is not
        raise CheckpointError(str(e)) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path} is not a captioning checkpoint: expected a dict with 'model' and 'model_config'")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version!r}; this version reads format {FORMAT_VERSION}")
    check_finite(state["model"], path)
    return state


def non_finite(weights: Any) -> list[str]:
    """Names of the floating-point tensors of ``weights`` holding a NaN or an infinity."""
    items = weights.items() if isinstance(weights, dict) else []
    return [k for k, v in items if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(weights: Any, source: str | Path) -> None:
    """A model whose weights hold NaN or inf (a diverged run) captions nothing: refuse it at load, by name."""
    bad = non_finite(weights)
    if bad:
        raise CheckpointError(f"{source} holds non-finite weights (NaN or inf in {len(bad)} tensors, e.g. "
                              f"{', '.join(bad[:3])}); refusing it (a diverged or damaged model)")


def make_checkpoint(model: CaptionModel, vocab: Vocabulary, **training_state: Any) -> dict[str, Any]:
    """``model`` is the plain module (the trainer unwraps DDP once)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model.cfg.to_dict(),
        "vocab": vocab.to_dict(),
        "model": model.state_dict(),
        **training_state,
    }


def model_from_checkpoint(state: dict[str, Any] | str | Path, source: str | Path = "checkpoint") -> tuple[CaptionModel, Vocabulary]:
    """Rebuild the model (in eval mode) and vocabulary from a checkpoint (a path, or a loaded dict) alone."""
    if isinstance(state, (str, Path)):
        source, state = state, load_checkpoint(state)
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
        vocab = Vocabulary.from_dict(state["vocab"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model config or vocabulary: {e}") from e
    if len(vocab) != cfg.vocab_size:
        raise CheckpointError(f"{source}: vocabulary has {len(vocab)} words but the model expects {cfg.vocab_size}")
    model = CaptionModel(cfg)
    load_model_weights(model, state["model"], source)
    return model.eval(), vocab


def load_model_weights(model: CaptionModel, weights: dict, source: str | Path = "checkpoint") -> None:
    """load_state_dict with a message that says which tensors differ, instead of a wall of keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [f"{k}: {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (checkpoint vs model, e.g. {shapes[:3]})")
        raise CheckpointError(f"{source} does not fit this model config: " + "; ".join(parts))
    model.load_state_dict(weights)


def describe_mismatch(saved: dict, current: dict, what: str = "model config") -> list[str]:
    """Human-readable differences between two config dicts, e.g. ["backbone: resnet18 (checkpoint) vs resnet101"]."""
    keys = sorted(set(saved) | set(current))
    return [f"{what} {k}: {saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (now)" for k in keys if saved.get(k) != current.get(k)]


def save_safetensors(model: CaptionModel, vocab: Vocabulary, directory: str | Path) -> Path:
    """Inference weights without pickle: model.safetensors + model.json (config and vocabulary)."""
    from safetensors.torch import save as st_save

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format_version": FORMAT_VERSION, "model_config": model.cfg.to_dict(), "vocab": vocab.to_dict()}
    atomic_write(directory / "model.safetensors", lambda f: f.write(st_save(tensors)))
    atomic_write_text(directory / "model.json", json.dumps(meta, indent=1))
    return directory


def load_safetensors(directory: str | Path) -> tuple[CaptionModel, Vocabulary]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / "model.json", directory / "model.safetensors"
    for p in (meta_path, weights_path):
        if not p.is_file():
            raise CheckpointError(f"missing {p} (expected model.safetensors + model.json in {directory})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} must hold a JSON object with model_config and vocab")
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    check_finite(weights, weights_path)
    return model_from_checkpoint({**meta, "model": weights}, source=meta_path)
