"""Training checkpoints: where they go, which one a run resumes from, and what must match to resume it.

    ckpt = Checkpointer(out, env)
    path = ckpt.find("auto")                 # newest loadable last.pt / best.pt, decided on rank 0
    ...
    ckpt.save(["best.pt", "last.pt"], state)  # every rank calls (RNG states are gathered); rank 0 writes atomically

The file format itself (tensors and plain values, ``weights_only=True``) is ``core.checkpoint``'s; this module adds
what only training knows: the RNG state of every rank, the run directory's two files, and resume compatibility.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.checkpoint import CheckpointError, describe_mismatch, load_checkpoint, non_finite
from core.fileio import atomic_write
from core.model import ModelConfig
from core.vocab import Vocabulary
from distributed.config import TrainConfig
from distributed.env import DistEnv, all_gather_objects, barrier, broadcast_object, warn0

# Settings that may change between a checkpoint and its resume (with a warning); anything in the model config or
# the vocabulary may not.
SOFT_SETTINGS = ("batch_size", "seed", "decoder_lr", "encoder_lr", "amp", "loader", "encoder_weights",
                 "fine_tune_encoder", "lr_schedule", "max_steps")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (numpy's array as a list) so weights_only loading works."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpointer:
    """Writes last.pt / best.pt in the run directory (rank 0, atomically) and finds the checkpoint to resume."""

    def __init__(self, out: Path, env: DistEnv) -> None:
        self.out, self.env = out, env

    def save(self, names: list[str], state: dict[str, Any]) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes. Refuses non-finite weights."""
        bad = non_finite(state["model"])
        if bad:  # every rank holds the same weights, so every rank stops here together
            raise CheckpointError(f"refusing to write a checkpoint with non-finite weights (e.g. {bad[:3]})")
        state["rng"] = all_gather_objects(rng_state())
        if self.env.is_main:
            for name in names:
                atomic_write(self.out / name, self.writer(state))
        # Every rank may read these files next (the final evaluation loads best.pt): none may read before rank 0
        # has replaced them, or it would evaluate the previous weights.
        barrier()

    @staticmethod
    def writer(state: dict[str, Any]) -> Callable:
        """The function that serializes ``state`` into an open file."""
        return lambda f: torch.save(state, f)

    def candidates(self) -> list[Path]:
        return sorted((p for p in (self.out / "last.pt", self.out / "best.pt") if p.is_file()),
                      key=lambda p: p.stat().st_mtime, reverse=True)

    def find(self, resume: str, fits: Callable[[dict], None] | None = None) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, the same on every rank).

        With ``--resume auto``, a file that cannot be read, holds non-finite weights, or fails ``fits`` (raises
        CheckpointError) is skipped with a warning, and the next newest one is taken."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                raise CheckpointError(f"--resume {resume}: no such file")
            return path
        choice = None
        if self.env.is_main:
            best_key = None
            for path in self.candidates():  # newest first; the furthest along wins, corrupt ones are skipped
                try:
                    state = load_checkpoint(path)
                    if fits is not None:
                        fits(state)
                except CheckpointError as e:
                    warn0(self.env, f"skipping {path}: {e}")
                    continue
                key = (int(state.get("step", 0)), path.stat().st_mtime)
                if best_key is None or key > best_key:
                    best_key, choice = key, str(path)
        choice = broadcast_object(choice)
        return Path(choice) if choice else None

    def remove_stale_temporaries(self) -> None:
        if self.env.is_main:
            for tmp in self.out.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)


def tensors_fit(model: torch.nn.Module, mcfg: ModelConfig) -> Callable[[dict], None]:
    """A ``find`` check: a checkpoint of this model config whose tensors do not have this model's shapes is damaged
    (another config is not: ``check_compatible`` says what differs and stops, it is not skipped)."""
    def check(state: dict) -> None:
        if describe_mismatch(state["model_config"], mcfg.to_dict()):
            return
        own, saved = model.state_dict(), state["model"]
        bad = sorted(set(own) ^ set(saved)) + [k for k, v in own.items()
                                              if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(v.shape)]
        if bad:
            raise CheckpointError(f"its tensors do not fit its own model config ({len(bad)} differ, "
                                  f"e.g. {', '.join(bad[:3])})")
    return check


def check_compatible(state: dict, cfg: TrainConfig, mcfg: ModelConfig, vocab: Vocabulary, path: Path,
                     env: DistEnv) -> None:
    """A checkpoint from another model config or vocabulary cannot be resumed: say what differs."""
    diffs = describe_mismatch(state["model_config"], mcfg.to_dict())
    saved_vocab = Vocabulary.from_dict(state["vocab"], source=f"{path} vocabulary")
    if saved_vocab != vocab:
        first = next((i for i, (a, b) in enumerate(zip(saved_vocab.itos, vocab.itos)) if a != b),
                     min(len(saved_vocab), len(vocab)))
        diffs.append(f"vocabulary: {len(saved_vocab)} words (checkpoint) vs {len(vocab)} (now), first difference at "
                     f"id {first} (different data or --min-word-freq?)")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it was trained with another setup:\n  "
                              + "\n  ".join(diffs)
                              + "\nuse another --out, or --resume none to start over in this one")
    saved = state.get("train_config", {})
    changed = describe_mismatch({k: saved.get(k) for k in SOFT_SETTINGS}, {k: getattr(cfg, k) for k in SOFT_SETTINGS},
                                "train config")
    if state.get("world_size") not in (None, env.world_size):
        changed.append(f"processes: {state['world_size']} (checkpoint) vs {env.world_size} (now)")
    for line in changed:
        warn0(env, f"resuming with a different setting: {line}")


def restore_scheduler(scheduler, saved: dict, cfg: TrainConfig, env: DistEnv) -> None:
    """The saved schedule where it is of the same kind; a per-step one otherwise restarts at the saved step."""
    if saved.get("train_config", {}).get("lr_schedule", "plateau") == cfg.lr_schedule:
        scheduler.load_state_dict(saved["scheduler"])
        return
    warn0(env, f"--lr-schedule {cfg.lr_schedule} differs from the checkpoint's: the schedule starts anew")
    if cfg.lr_schedule == "cosine":
        scheduler.last_epoch = int(saved["step"]) - 1
        scheduler.step()


# Rows of these tensors are indexed by word id: mapped word by word between vocabularies.
WORD_ROWS = ("decoder.embedding.weight", "decoder.fc.weight", "decoder.fc.bias")


def init_weights_from(model: torch.nn.Module, vocab: Vocabulary, path: str | Path) -> str:
    """Start ``model`` (built for ``vocab``) from the weights of another captioner's checkpoint (ours or imported).

    Every tensor whose name and shape fit is copied; the word-indexed rows (embedding, output layer) are copied
    for the words both vocabularies share and keep their fresh initialization for the others. The model's
    architecture must match the checkpoint's (a clear error lists the flags to set). Returns a one-line report.
    """
    saved = load_checkpoint(path)
    mine = model.cfg.to_dict()
    # vocab_size may differ (rows are mapped) and dropout is a training setting, not a shape.
    arch = {k: v for k, v in saved["model_config"].items()
            if k in mine and k not in ("vocab_size", "dropout") and mine[k] != v}
    if arch:
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in arch.items())
        raise CheckpointError(f"--init-from {path}: the checkpoint's model differs from the configured one; add: {flags}")
    their_vocab = Vocabulary.from_dict(saved["vocab"], source=f"{path} vocabulary")
    shared = [(i, their_vocab.stoi[w]) for i, w in enumerate(vocab.itos) if w in their_vocab.stoi]
    mine_ids = torch.tensor([a for a, _ in shared], dtype=torch.long)
    their_ids = torch.tensor([b for _, b in shared], dtype=torch.long)
    state = model.state_dict()
    copied, mapped, skipped = 0, 0, []
    with torch.no_grad():
        for name, value in saved["model"].items():
            if name not in state:
                skipped.append(name)
            elif name in WORD_ROWS:
                state[name][mine_ids] = value[their_ids].to(state[name].dtype)
                mapped += 1
            elif state[name].shape == value.shape:
                state[name].copy_(value)
                copied += 1
            else:
                skipped.append(name)
    model.load_state_dict(state)
    new = [w for w in vocab.itos if w not in their_vocab.stoi]
    return (f"initialized from {path}: {copied} tensors copied, {mapped} mapped by word ({len(shared)} of "
            f"{len(vocab)} words shared), {len(skipped)} skipped{' (' + ', '.join(skipped[:3]) + ')' if skipped else ''}"
            f"; new words with fresh rows: {', '.join(new[:10]) + (' ...' if len(new) > 10 else '') if new else 'none'}")
