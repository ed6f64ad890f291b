"""Train Show, Attend and Tell: DDP over torchrun, AMP, DALI or torch loading, checkpoint/resume, val BLEU.

    torchrun --standalone --nproc_per_node=2 distributed/train.py --data Flickr8k --out runs/flickr8k
    ./launch.sh demo                      # synthetic data, 2 CPU processes, --preset demo (see launch.sh)
    python distributed/train.py --help    # every flag (generated from distributed/config.py:TrainConfig)

Also runs as a plain single process (``python distributed/train.py ...``). The run directory (``--out``) gets
config.json (the resolved config), vocab.json, last.pt (every epoch and every --save-every steps), best.pt (best
val BLEU-4), metrics.csv, learning_curve.png, test_metrics.json and examples/ (captioned val images with
attention maps). ``--resume auto`` (the default) continues from the newest loadable checkpoint in --out at the
exact batch where it was saved, so ``torchrun --max-restarts=1`` loses at most the work since the last save.

Test hooks (environment variables, used by tests/test_train*.py; nothing else should set them):
    SAT_INJECT_NAN_AT_STEP=n   rank 0's loss becomes NaN at optimizer step n
    SAT_CRASH_AT_STEP=n        rank SAT_CRASH_RANK (default: the last rank) SIGKILLs itself after step n
    SAT_CRASH_IN_SAVE=k        rank 0 dies halfway through writing its k-th checkpoint file
    SAT_PARAM_HASH_DIR=DIR     after training, each rank writes DIR/rank<r>.txt: a hash of its weights and buffers
The crash hooks fire on the first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun distributed/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from core import hardware
from core.checkpoint import CheckpointError, describe_mismatch, load_checkpoint, make_checkpoint
from core.data import CaptionTable, DataFormatError, DatasetNotFoundError, Flickr8k, image_transform, load_flickr8k, \
    ImageLoadError, load_image
from core.datacheck import SKIP_LIST_NAME, SkipListError, apply_skip_list, read_skip_list
from core.decode import beam_search
from core.fileio import WriteError, atomic_write, atomic_write_text
from core.metrics import caption_metrics
from core.model import CaptionModel, ModelConfig, PretrainedWeightsError, caption_loss, load_pretrained_encoder
from core.vocab import Vocabulary
from distributed.config import TrainConfig, parse_config
from distributed.env import DistEnv, all_gather_objects, all_reduce_mean, all_reduce_sum, barrier, broadcast_buffers, \
    broadcast_object, cleanup, print0, setup_distributed, warn0
from distributed.loaders import EvalLoader, default_workers, make_train_loader, resolve_loader

CSV_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "bleu1", "bleu2", "bleu3", "bleu4", "cider", "lr",
               "samples_per_s", "elapsed"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...): the message says why and what to try."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained (0-based)
    batches_done: int = 0  # batches of that epoch already trained (the position a resume starts from)
    step: int = 0  # optimizer steps in total
    train_seconds: float = 0.0  # time spent training (the --time-budget clock; eval and saving excluded)
    best_bleu4: float = -1.0
    best_epoch: float = 0.0
    bad_epochs: int = 0  # epochs since val BLEU-4 last improved (early stopping)
    skipped_steps: int = 0  # consecutive fp16 overflow steps
    history: list = field(default_factory=list)  # one dict per evaluation (the rows of metrics.csv)


# ----------------------------------------------------------------------------------------------------- test hooks
class Hooks:
    """Fault injection for the tests, from environment variables (see the module docstring)."""

    def __init__(self) -> None:
        env = os.environ
        first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.nan_at = int(env.get("SAT_INJECT_NAN_AT_STEP", 0))
        self.crash_at = int(env.get("SAT_CRASH_AT_STEP", 0)) if first_attempt else 0
        self.crash_rank = int(env["SAT_CRASH_RANK"]) if "SAT_CRASH_RANK" in env else None
        self.crash_in_save = int(env.get("SAT_CRASH_IN_SAVE", 0)) if first_attempt else 0
        self.saves = 0
        self.hash_dir = env.get("SAT_PARAM_HASH_DIR")

    def after_training(self, model: torch.nn.Module, env: DistEnv) -> None:
        if self.hash_dir:
            Path(self.hash_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.hash_dir) / f"rank{env.rank}.txt").write_text(state_hash(model.state_dict()) + "\n")

    def loss(self, loss: torch.Tensor, step: int, env: DistEnv) -> torch.Tensor:
        if self.nan_at and step == self.nan_at and env.is_main:
            print(f"[test hook] rank 0: injecting NaN into the loss at step {step}", file=sys.stderr, flush=True)
            return loss * float("nan")
        return loss

    def after_step(self, step: int, env: DistEnv) -> None:
        rank = env.world_size - 1 if self.crash_rank is None else self.crash_rank
        if self.crash_at and step == self.crash_at and env.rank == rank:
            print(f"[test hook] rank {rank}: killing myself after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def write_fn(self, state: dict):
        """The function that writes a checkpoint file (rank 0); the hook tears the k-th write."""
        self.saves += 1
        if not (self.crash_in_save and self.saves == self.crash_in_save):
            return lambda f: torch.save(state, f)

        def torn_write(f):
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            print(f"[test hook] dying halfway through checkpoint write #{self.saves}", file=sys.stderr, flush=True)
            os._exit(3)

        return torn_write


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of every tensor (identical weights <=> identical hash)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ building
def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """plateau: stepped once per epoch on val BLEU-4; cosine: stepped once per optimizer step."""
    if cfg.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.lr_factor,
                                                          patience=cfg.lr_patience)
    warmup, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_data(cfg: TrainConfig, env: DistEnv | None = None) -> tuple[Flickr8k, Vocabulary]:
    data = load_flickr8k(cfg.data, karpathy_json=cfg.karpathy_json, seed=cfg.split_seed, val_frac=cfg.val_frac,
                         test_frac=cfg.test_frac)
    # DALI cannot skip a sample at run time, and ranks that skip differently hang DDP: bad images are left out
    # here, by the same file on every rank, after the split so that every other image keeps its split.
    skip_path = Path(cfg.data) / SKIP_LIST_NAME if cfg.skip_list == "auto" else Path(cfg.skip_list)
    if cfg.skip_list != "none" and (cfg.skip_list != "auto" or skip_path.is_file()):
        skip = read_skip_list(skip_path, root=cfg.data)
        data = apply_skip_list(data, skip)
        if env is not None:
            print0(env, f"skipping {len(skip.skip)} image(s) listed in {skip_path}")
    # Deterministic (sorted by frequency, then alphabetically): every rank builds the same vocabulary.
    return data, data.build_vocab(min_freq=cfg.min_word_freq)


def model_config(cfg: TrainConfig, vocab: Vocabulary) -> ModelConfig:
    return ModelConfig(vocab_size=len(vocab), backbone=cfg.backbone, encoded_size=cfg.encoded_size,
                       image_size=cfg.image_size, attention_dim=cfg.attention_dim, embed_dim=cfg.embed_dim,
                       decoder_dim=cfg.decoder_dim, dropout=cfg.dropout)


def build_model(cfg: TrainConfig, vocab: Vocabulary) -> CaptionModel:
    model = CaptionModel(model_config(cfg, vocab))
    if cfg.encoder_pretrained:
        load_pretrained_encoder(model.encoder, cfg.backbone, cfg.encoder_weights)
        model.encoder.fine_tune(cfg.fine_tune_encoder)  # frozen; with fine-tuning, blocks 2-4 train
    else:
        # A random frozen encoder would give the decoder noise to attend to: train all of it.
        for p in model.encoder.parameters():
            p.requires_grad = True
    return model


def build_optimizer(model: CaptionModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": [p for p in model.decoder.parameters() if p.requires_grad], "lr": cfg.decoder_lr,
               "name": "decoder"}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr, "name": "encoder"})
    return torch.optim.Adam(groups)


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


# ---------------------------------------------------------------------------------------------------- checkpoints
class Checkpointer:
    """Writes last.pt / best.pt in the run directory (rank 0, atomically) and finds the checkpoint to resume."""

    def __init__(self, out: Path, env: DistEnv, hooks: Hooks) -> None:
        self.out, self.env, self.hooks = out, env, hooks

    def save(self, names: list[str], state: dict[str, Any]) -> None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes. Refuses non-finite weights."""
        bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # every rank holds the same weights, so every rank stops here together
            raise TrainingError(f"refusing to write a checkpoint with non-finite weights (e.g. {bad[:3]})")
        state["rng"] = all_gather_objects(rng_state())
        if self.env.is_main:
            for name in names:
                atomic_write(self.out / name, self.hooks.write_fn(state))

    def candidates(self) -> list[Path]:
        return sorted((p for p in (self.out / "last.pt", self.out / "best.pt") if p.is_file()),
                      key=lambda p: p.stat().st_mtime, reverse=True)

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from (decided on rank 0, the same on every rank)."""
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
    soft = ["batch_size", "seed", "decoder_lr", "encoder_lr", "amp", "loader", "encoder_weights", "fine_tune_encoder"]
    changed = describe_mismatch({k: saved.get(k) for k in soft}, {k: getattr(cfg, k) for k in soft}, "train config")
    if state.get("world_size") not in (None, env.world_size):
        changed.append(f"processes: {state['world_size']} (checkpoint) vs {env.world_size} (now)")
    for line in changed:
        warn0(env, f"resuming with a different setting: {line}")


# ------------------------------------------------------------------------------------------------- train/evaluate
def clip_gradients(optimizer: torch.optim.Optimizer, clip: float) -> None:
    """Clamp each gradient value to [-clip, clip] (the tutorial's clip_gradient)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads and clip > 0:
        torch._foreach_clamp_min_(grads, -clip)
        torch._foreach_clamp_max_(grads, clip)


def train_one_epoch(model: torch.nn.Module, loader, optimizer, scaler, autocast, cfg: TrainConfig, env: DistEnv,
                    state: TrainState, hooks: Hooks, save_last, scheduler) -> dict[str, Any]:
    """Train from ``state.batches_done`` to the end of ``state.epoch`` (or an earlier stop).

    Returns {"train_loss", "samples_per_s", "stop": None | "time budget" | "max steps"}. Stops with a
    TrainingError, on every rank together, before an update with a non-finite loss (fp16: after too many skips).
    """
    model.train()
    inner = getattr(model, "module", model)
    if not cfg.train_encoder:
        inner.encoder.eval()  # frozen pretrained encoder: keep its BatchNorm statistics
    budget_s = cfg.time_budget * 60.0
    batches = loader.epoch(state.epoch, state.batches_done)
    bar = tqdm(batches, total=loader.num_batches, initial=state.batches_done, unit="batch",
               desc=f"epoch {state.epoch + 1}", disable=not (env.is_main and cfg.progress), dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, file=sys.stderr)
    loss_sum, steps, samples, seconds, stop = 0.0, 0, 0, 0.0, None
    tick = time.perf_counter()
    for batch in bar:
        with autocast:
            logits, alphas = model(batch.images, batch.captions, batch.lengths)
            loss = caption_loss(logits, batch.captions, batch.lengths, alphas, cfg.alpha_c)
        loss = hooks.loss(loss, state.step + 1, env)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        over_budget = budget_s > 0 and state.train_seconds + (time.perf_counter() - tick) >= budget_s
        # One small collective per step: every rank sees the same mean loss and stop flag, so all stop together.
        reduced = all_reduce_mean(torch.stack([loss.detach().float(), torch.tensor(float(over_budget), device=loss.device)]))
        mean_loss, over_budget = float(reduced[0]), bool(reduced[1] > 0)
        if not math.isfinite(mean_loss) and not scaler.is_enabled():
            raise TrainingError(
                f"the loss is {mean_loss} at step {state.step + 1} (epoch {state.epoch + 1}, batch "
                f"{state.batches_done + 1}) with amp={cfg.amp}: stopped before this update. The last checkpoint "
                f"holds finite weights. Try a lower --decoder-lr/--encoder-lr, --grad-clip, or --amp off.")
        scaler.unscale_(optimizer)
        clip_gradients(optimizer, cfg.grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)  # fp16: skipped when the gradients overflowed
        scaler.update()
        if cfg.lr_schedule == "cosine":  # (plateau steps once per epoch, on val BLEU-4)
            scheduler.step()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            state.skipped_steps += 1
            if state.skipped_steps > cfg.max_skipped_steps:
                raise TrainingError(f"{state.skipped_steps} consecutive fp16 steps overflowed (last loss "
                                    f"{mean_loss}): training diverged. Try --amp bf16 or off, or a lower lr.")
        else:
            state.skipped_steps = 0
        state.step += 1
        state.batches_done += 1
        if math.isfinite(mean_loss):
            loss_sum, steps = loss_sum + mean_loss, steps + 1
        samples += batch.images.shape[0] * env.world_size  # every rank's batch has the same size
        now = time.perf_counter()
        state.train_seconds += now - tick
        seconds += now - tick
        bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{samples / max(seconds, 1e-9):.1f}", refresh=False)
        if cfg.max_steps and state.step >= cfg.max_steps:
            stop = "max steps"
        elif over_budget:
            stop = "time budget"
        if cfg.save_every and state.step % cfg.save_every == 0 and not stop:  # (a stop saves after its eval)
            broadcast_buffers(model)
            save_last()
        hooks.after_step(state.step, env)
        tick = time.perf_counter()  # checkpoint time is not training time
        if stop:
            break
    bar.close()
    return {"train_loss": loss_sum / steps if steps else float("nan"), "samples_per_s": samples / max(seconds, 1e-9),
            "stop": stop}


@torch.no_grad()
def recompute_bn_stats(encoder: torch.nn.Module, batches, autocast) -> bool:
    """Precise BatchNorm: replace the running averages by the statistics of ``batches`` (train mode, no update).

    With fast-changing weights (an encoder trained from scratch at a high learning rate) the exponential running
    averages can lag so far behind that eval-mode outputs collapse while train-mode ones are fine. The result is
    averaged over ranks, so every rank holds the same model. Training itself is unaffected (it normalizes with
    batch statistics). Returns False (and changes nothing) when there is no batch or no BatchNorm.
    """
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    batches = iter(batches)
    first = next(batches, None)
    if not bns or first is None:
        return False
    momenta, was_training = [bn.momentum for bn in bns], encoder.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    encoder.train()
    for batch in itertools.chain([first], batches):
        with autocast:
            encoder(batch.images)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
        bn.running_var.copy_(all_reduce_mean(bn.running_var))
    encoder.train(was_training)
    return True


@torch.no_grad()
def evaluate(model: CaptionModel, loader: EvalLoader, table: CaptionTable, vocab: Vocabulary, autocast,
             cfg: TrainConfig, env: DistEnv, beam_size: int) -> dict[str, Any]:
    """Teacher-forced loss over all reference captions and beam-search BLEU-1..4 / CIDEr on one split.

    Each rank scores its share of the images; duplicates (padding) are dropped by image index; hypotheses are
    gathered and scored on rank 0 and the scores are broadcast, so every rank returns the same dict. The
    hypotheses (``{index: tokens}``) are returned on rank 0 only.
    """
    model.eval()
    hyps: dict[int, list[int]] = {}
    totals = torch.zeros(2, dtype=torch.float64)  # loss x captions, captions
    for batch in loader:
        keep = torch.tensor([int(i) not in hyps for i in batch.indices])
        if not keep.any():
            continue
        idx = batch.indices[keep]
        images = batch.images[keep.to(batch.images.device)]
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        caps, lens = table.tokens[idx], table.lengths[idx]  # (B, K, T), (B, K): all references
        with autocast:
            enc = model.encoder(images).flatten(1, 2)  # (B, P, C)
            k = caps.shape[1]
            rows = lens.reshape(-1) > 0
            dev = enc.device
            lens_r = lens.reshape(-1)[rows].to(dev)
            caps_r = caps.reshape(-1, caps.shape[-1])[rows][:, : int(lens_r.max())].to(dev)
            logits, alphas = model.decoder(enc.repeat_interleave(k, 0)[rows.to(dev)], caps_r, lens_r)
            loss = caption_loss(logits, caps_r, lens_r, alphas, cfg.alpha_c)
            found = beam_search(model.decoder.encode_features(enc), model.step, beam_size, cfg.max_decode_len,
                                vocab.start_id, vocab.end_id)
        totals += torch.tensor([float(loss) * len(lens_r), len(lens_r)], dtype=torch.float64)
        for i, h in zip(idx.tolist(), found):
            hyps[i] = h.tokens
    totals = all_reduce_sum(totals.to(env.device)).cpu()
    gathered = all_gather_objects(hyps)
    metrics = None
    if env.is_main:
        merged: dict[int, list[int]] = {}
        for part in gathered:
            merged.update(part)
        order = sorted(merged)
        if order:
            metrics = caption_metrics([vocab.decode_tokens(merged[i]) for i in order],
                                      [table.references(i) for i in order])
        else:
            metrics = {k: float("nan") for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}
        metrics["images"] = len(order)
        hyps = merged
    metrics = broadcast_object(metrics)
    metrics["loss"] = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    metrics["hypotheses"] = hyps if env.is_main else {}
    return metrics


# ---------------------------------------------------------------------------------------------------- reporting
def write_metrics_csv(path: Path, history: list[dict]) -> None:
    def write(f):
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        f.write(text.getvalue().encode())

    atomic_write(path, write)


def write_examples(model: CaptionModel, data: Flickr8k, vocab: Vocabulary, cfg: TrainConfig, autocast,
                   out: Path) -> list[dict]:
    """Caption the first val images with beam search; save captioned images and attention figures."""
    from core.viz import save_attention_figure, save_captioned_image

    names = data.splits["val"][: cfg.num_examples]
    if not names:
        return []
    transform = image_transform(cfg.image_size, train=False)
    device = next(model.parameters()).device
    images = torch.stack([transform(load_image(data.image_path(n))) for n in names]).to(device)
    model.eval()
    with torch.no_grad(), autocast:
        found = beam_search(model.encode(images), model.step, cfg.test_beam_size, cfg.max_decode_len,
                            vocab.start_id, vocab.end_id)
    rows = []
    for name, hyp in zip(names, found):
        words = [vocab.itos[t] for t in hyp.tokens]
        stem = Path(name).stem
        save_captioned_image(data.image_path(name), " ".join(words), out / f"{stem}_caption.png")
        if words:
            save_attention_figure(data.image_path(name), words, hyp.alphas, grid=cfg.encoded_size,
                                  path=out / f"{stem}_attention.png", size=max(cfg.image_size, 96))
        rows.append({"image": name, "caption": " ".join(words), "references": data.captions[name]})
    atomic_write_text(out / "captions.json", json.dumps(rows, indent=1) + "\n")
    return rows


def fmt_metrics(m: dict) -> str:
    return (f"loss {m['loss']:.3f} | BLEU-1..4 {m['bleu1']:.3f} {m['bleu2']:.3f} {m['bleu3']:.3f} "
            f"{m['bleu4']:.3f} | CIDEr {m['cider']:.3f}")


# ---------------------------------------------------------------------------------------------------------- main
def run(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """Everything from data to test metrics. The DDP model and the optimizer live and die in this function."""
    hooks = Hooks()
    out = Path(cfg.out)
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create the run directory {out}: {e.strerror or e}") from e
    barrier()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    data, vocab = load_data(cfg, env)
    loader_kind = resolve_loader(cfg.loader)
    workers = default_workers(loader_kind, env, cfg.workers, cfg.deterministic)
    print0(env, f"hardware: {hardware.summary()}")
    amp = hardware.choose_amp(cfg.amp, env.device.type, hardware.detect())
    if amp.warning:
        warn0(env, amp.warning)
    amp_dtype = amp.value
    autocast = nullcontext() if amp_dtype is None else torch.autocast(env.device.type, dtype=amp_dtype)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype is torch.float16)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, vocab).to(env.device)
    if cfg.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    seed_everything(cfg.seed + 1 + 7919 * env.rank)  # dropout and augmentation differ between ranks
    state = TrainState()
    ckpt = Checkpointer(out, env, hooks)
    ckpt.remove_stale_temporaries()
    resume_path = ckpt.find(cfg.resume)
    if resume_path is not None:
        saved = load_checkpoint(resume_path, map_location=env.device)
        check_compatible(saved, cfg, model.cfg, vocab, resume_path, env)
        model.load_state_dict(saved["model"])
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"cannot resume the optimizer from {resume_path}: {e} (was --fine-tune-encoder "
                                  "or --encoder-weights changed?)") from e
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        if saved.get("train_config", {}).get("lr_schedule", "plateau") == cfg.lr_schedule:
            scheduler.load_state_dict(saved["scheduler"])
        else:  # another kind of scheduler: its saved state does not apply
            warn0(env, f"--lr-schedule {cfg.lr_schedule} differs from the checkpoint's: the schedule starts anew")
            if cfg.lr_schedule == "cosine":  # at the checkpoint's step
                scheduler.last_epoch = int(saved["step"]) - 1
                scheduler.step()
        state = TrainState(**saved["train_state"], history=saved.get("history", []))
        rngs = saved.get("rng") or []
        if len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            seed_everything(cfg.seed + 1 + 7919 * env.rank + state.step)
        print0(env, f"resumed from {resume_path}: epoch {state.epoch + 1}, batch {state.batches_done}, "
                    f"step {state.step}, {state.train_seconds:.0f}s trained")
        del saved

    train_model = DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None) \
        if env.distributed else model  # `model` stays the unwrapped module
    train_table = data.caption_table("train", vocab, max_len=cfg.max_caption_len)
    val_table = data.caption_table("val", vocab, max_len=cfg.max_caption_len)
    train_loader = make_train_loader(loader_kind, data, train_table, cfg.image_size, cfg.batch_size, env, cfg.seed,
                                     workers, cfg.hflip, cfg.random_crop, cfg.channels_last)
    val_loader = EvalLoader(data, val_table, cfg.image_size, cfg.eval_batch_size, env, loader_kind, workers, "val",
                            cfg.val_max_images)
    if env.is_main:
        vocab.save(out / "vocab.json")
        cfg.save(out / "config.json", world_size=env.world_size, device=str(env.device), loader=loader_kind,
                 workers=workers, amp_dtype=hardware.dtype_name(amp_dtype), amp_reason=amp.reason,
                 hardware=hardware.summary(),
                 threads=torch.get_num_threads(), torch=torch.__version__, resumed_from=str(resume_path or ""),
                 splits=data.splits.sizes(), vocab_size=len(vocab))
    print0(env, f"amp {hardware.dtype_name(amp_dtype)}: {amp.reason}")
    print0(env, f"{env.world_size} process(es) on {env.device} | loader {loader_kind} ({workers} workers) | "
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
                f"trained params | splits {data.splits.sizes()} | vocab {len(vocab)} | "
                f"{train_loader.num_batches} batches/epoch of {cfg.batch_size}x{env.world_size}")

    bn_loader = make_train_loader(loader_kind, data, train_table, cfg.image_size, cfg.batch_size, env, cfg.seed + 1,
                                  0 if loader_kind == "torch" else workers, cfg.hflip, cfg.random_crop,
                                  cfg.channels_last) if cfg.precise_bn and cfg.train_encoder else None

    def refresh_bn(epoch: int) -> None:
        """Precise BatchNorm statistics before an evaluation; else one model on every rank: rank 0's statistics."""
        if bn_loader is None or not recompute_bn_stats(
                model.encoder, itertools.islice(bn_loader.epoch(epoch), cfg.precise_bn), autocast):
            broadcast_buffers(model)
        if bn_loader is not None:
            bn_loader.close()

    def checkpoint_state() -> dict[str, Any]:
        return make_checkpoint(model, vocab, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                               scheduler=scheduler.state_dict(), epoch=state.epoch, step=state.step,
                               batches_done=state.batches_done, history=state.history,
                               train_state={k: v for k, v in asdict(state).items() if k != "history"},
                               train_config=cfg.to_dict(), world_size=env.world_size)

    def save(names: list[str]) -> None:
        ckpt.save(names, checkpoint_state())

    budget_s = cfg.time_budget * 60.0
    while state.epoch < cfg.epochs:
        if (budget_s and state.train_seconds >= budget_s) or (cfg.max_steps and state.step >= cfg.max_steps):
            break
        stats = train_one_epoch(train_model, train_loader, optimizer, scaler, autocast, cfg, env, state, hooks,
                                lambda: save(["last.pt"]), scheduler)
        full_epoch = state.batches_done >= train_loader.num_batches
        if full_epoch:
            state.epoch, state.batches_done = state.epoch + 1, 0
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[env.local_rank] if env.device.type == "cuda" else []):
            # (the global RNG is left as it was: a run stopped and resumed here stays bit-identical)
            refresh_bn(state.epoch)
            m = evaluate(model, val_loader, val_table, vocab, autocast, cfg, env, cfg.val_beam_size)
        improved = m["bleu4"] > state.best_bleu4
        if full_epoch:  # partial epochs (a stop) do not count for the scheduler or early stopping
            if cfg.lr_schedule == "plateau":
                scheduler.step(m["bleu4"])
            state.bad_epochs = 0 if improved else state.bad_epochs + 1
        epoch_pos = state.epoch + state.batches_done / train_loader.num_batches
        state.history.append({
            "epoch": round(epoch_pos, 3), "step": state.step, "train_loss": stats["train_loss"],
            "val_loss": m["loss"], **{k: m[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")},
            "lr": optimizer.param_groups[0]["lr"], "samples_per_s": stats["samples_per_s"],
            "elapsed": state.train_seconds,
        })
        if improved:
            state.best_bleu4, state.best_epoch = m["bleu4"], epoch_pos
        save(["best.pt", "last.pt"] if improved else ["last.pt"])
        if env.is_main:
            write_metrics_csv(out / "metrics.csv", state.history)
        print0(env, f"epoch {epoch_pos:.2f}/{cfg.epochs} step {state.step} | train loss {stats['train_loss']:.3f} | "
                    f"val {fmt_metrics(m)} | lr {optimizer.param_groups[0]['lr']:.2g} | "
                    f"{stats['samples_per_s']:.1f} samples/s | trained {state.train_seconds:.0f}s | "
                    f"eval {time.perf_counter() - t0:.0f}s{' | best' if improved else ''}")
        if stats["stop"]:
            print0(env, f"stopping: {stats['stop']} reached")
            break
        if cfg.early_stop and state.bad_epochs >= cfg.early_stop:
            print0(env, f"early stop: no better val BLEU-4 for {state.bad_epochs} epochs")
            break
    train_loader.close()
    val_loader.close()
    del train_model, optimizer  # the DDP wrapper must be gone before the process group is destroyed
    hooks.after_training(model, env)

    result: dict[str, Any] = {"state": state}
    if cfg.final_eval:
        result["test"] = final_evaluation(model, data, vocab, cfg, env, autocast, loader_kind, workers, out, state)
    return result


def final_evaluation(model: CaptionModel, data: Flickr8k, vocab: Vocabulary, cfg: TrainConfig, env: DistEnv,
                     autocast, loader_kind: str, workers: int, out: Path, state: TrainState) -> dict[str, Any]:
    """Test metrics of best.pt (beam --test-beam-size), the learning curve and captioned val examples."""
    best = out / "best.pt"
    source, weights_step = "final weights", state.step
    if best.is_file():
        saved = load_checkpoint(best, map_location=env.device)
        model.load_state_dict(saved["model"])
        source = f"best.pt (epoch {state.best_epoch:g}, val BLEU-4 {state.best_bleu4:.4f})"
        weights_step = int(saved["step"])
        del saved
    test = {}
    if data.splits["test"]:
        table = data.caption_table("test", vocab, max_len=cfg.max_caption_len)
        loader = EvalLoader(data, table, cfg.image_size, cfg.eval_batch_size, env, loader_kind, workers, "test")
        t0 = time.perf_counter()
        m = evaluate(model, loader, table, vocab, autocast, cfg, env, cfg.test_beam_size)
        loader.close()
        test = {k: m[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "loss", "images")}
        test.update(beam_size=cfg.test_beam_size, weights=source, weights_step=weights_step, steps=state.step,
                    train_seconds=round(state.train_seconds, 1), eval_seconds=round(time.perf_counter() - t0, 1))
        print0(env, f"test ({test['images']} images, beam {cfg.test_beam_size}, {source}): {fmt_metrics(m)}")
    if env.is_main:
        if test:
            atomic_write_text(out / "test_metrics.json", json.dumps(test, indent=1) + "\n")
        if state.history:
            from core.viz import plot_learning_curve

            plot_learning_curve(state.history, out / "learning_curve.png", title=f"{cfg.backbone} on {cfg.data}")
        if cfg.num_examples > 0:
            write_examples(model, data, vocab, cfg, autocast, out / "examples")
        print0(env, f"outputs in {out}/: best.pt last.pt metrics.csv learning_curve.png test_metrics.json examples/")
    return test


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="distributed/train.py", description=__doc__)
    env = setup_distributed(threads=cfg.threads)
    code = 0
    try:
        run(cfg, env)
    except (DatasetNotFoundError, DataFormatError) as e:
        print0(env, f"error: {e}\nno dataset yet? `./launch.sh demo` generates a synthetic one in the Flickr8k "
                    f"layout and trains on it.", file=sys.stderr)
        code = 2
    except (ImageLoadError, SkipListError) as e:
        print(f"error (rank {env.rank}): {e}\nrun `python -m core.data check {cfg.data}`: it lists every bad file and "
              f"writes the skip list that training reads", file=sys.stderr, flush=True)
        code = 2
    except (TrainingError, CheckpointError, PretrainedWeightsError, WriteError) as e:
        print(f"error (rank {env.rank}): {e}", file=sys.stderr, flush=True)
        code = 1
    # Leaving the except blocks released the traceback, and with it run()'s frame (the DDP model, the optimizer).
    cleanup(barrier=code == 0)  # after an error the other ranks may never reach a barrier
    return code


if __name__ == "__main__":
    sys.exit(main())
