"""Train Show, Attend and Tell: DDP over torchrun, AMP, DALI or torch loading, checkpoint/resume, val BLEU.

    torchrun --standalone --nproc_per_node=2 distributed/train.py --data Flickr8k --out runs/flickr8k
    ./launch.sh demo                      # synthetic data, 2 CPU processes, --preset demo (see launch.sh)
    python distributed/train.py --help    # every flag (generated from distributed/config.py:TrainConfig)

Also runs as a plain single process (``python distributed/train.py ...``). The run directory (``--out``) gets
config.json (the resolved config), vocab.json, last.pt (every epoch and every --save-every steps), best.pt (best
val BLEU-4), metrics.csv, learning_curve.png, test_metrics.json and examples/ (captioned val images with
attention maps). ``--resume auto`` (the default) continues from the newest loadable checkpoint in --out at the
exact batch where it was saved, so ``torchrun --max-restarts=1`` loses at most the work since the last save.

Reads top to bottom: ``main`` -> ``run`` (data, model, resume, loaders) -> ``fit`` (per epoch: ``train_one_epoch``,
``validate``, save) -> ``final_evaluation``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script (torchrun distributed/train.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from core import hardware
from core.checkpoint import CheckpointError, load_checkpoint, load_model_weights, make_checkpoint
from core.data import CaptionDataset, DataFormatError, DatasetNotFoundError
from core.fileio import WriteError, atomic_write_text
from core.images import ImageLoadError
from core.logs import setup_logging, verbosity_from
from core.model import CaptionModel, PretrainedWeightsError, caption_loss, load_pretrained_encoder
from core.skiplist import SkipListError
from core.vocab import Vocabulary
from distributed.resume import (Checkpointer, check_compatible, init_weights_from, restore_scheduler,
                                    seed_everything, set_rng_state, tensors_fit)
from distributed.config import TrainConfig, parse_config
from distributed.env import DistEnv, all_reduce_mean, barrier, broadcast_buffers, cleanup, log_round, print0, \
    setup_distributed, warn0
from distributed.eval_loop import coco_results, coco_test_metrics, evaluate, validate
from distributed.feature_cache import FeatureCacheError, open_feature_cache
from distributed.loaders import EvalLoader, Loaders, build_loaders, default_workers, load_data
from distributed.optim import build_optimizer, build_scheduler, clip_gradients
from distributed.run_outputs import fmt_coco, fmt_metrics, write_examples, write_learning_curve, write_metrics_csv
from distributed.scst import Scst
from distributed.step_timer import StepTimer
from distributed.tensorboard_log import TensorBoardLog


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
    step_losses: list = field(default_factory=list)  # [epoch position, mean loss] per step (the learning curve)


@dataclass
class Trainee:
    """The model and what updates it. ``model`` is the plain module (saved, evaluated); ``ddp`` trains it."""

    model: CaptionModel
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # ReduceLROnPlateau (stepped per epoch) or LambdaLR (per step)
    scaler: torch.amp.GradScaler  # enabled for fp16 only: a no-op otherwise, so the loop has no fp16 branches
    autocast: Any  # torch.autocast(...) or nullcontext()
    scst: Scst | None = None  # the SCST stage (--scst, --scst-after): distributed/scst.py

    def checkpoint(self, vocab: Vocabulary, state: TrainState, cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
        train_state = {k: v for k, v in asdict(state).items() if k != "history"}
        return make_checkpoint(self.model, vocab, optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                               scheduler=self.scheduler.state_dict(), epoch=state.epoch, step=state.step,
                               batches_done=state.batches_done, history=state.history, train_state=train_state,
                               train_config=cfg.to_dict(), world_size=env.world_size)


# ------------------------------------------------------------------------------------------------------ building
def build_model(cfg: TrainConfig, vocab: Vocabulary) -> CaptionModel:
    model = CaptionModel(replace(cfg.model, vocab_size=len(vocab)))
    if cfg.encoder_pretrained:
        if not cfg.init_from:  # (with --init-from, build_trainee copies the checkpoint's encoder in)
            load_pretrained_encoder(model.encoder, cfg.model.backbone, cfg.encoder_weights)
        model.encoder.fine_tune(cfg.fine_tune_encoder)  # frozen; with fine-tuning, blocks 2-4 train
    else:
        # A random frozen encoder would give the decoder noise to attend to: train all of it.
        for p in model.encoder.parameters():
            p.requires_grad = True
    return model


def build_trainee(cfg: TrainConfig, vocab: Vocabulary, env: DistEnv) -> tuple[Trainee, hardware.Choice]:
    """Model (the same initial weights on every rank), optimizer, scheduler and the precision the hardware runs."""
    amp = hardware.choose_amp(cfg.amp, env.device.type, hardware.detect())
    if amp.warning:
        warn0(env, amp.warning)
    seed_everything(cfg.seed)
    model = build_model(cfg, vocab).to(env.device)
    if cfg.init_from:
        print0(env, init_weights_from(model, vocab, cfg.init_from))
    if cfg.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg)
    seed_everything(cfg.seed + 1 + 7919 * env.rank)  # dropout and augmentation differ between ranks
    autocast = nullcontext() if amp.value is None else torch.autocast(env.device.type, dtype=amp.value)
    trainee = Trainee(model=model, ddp=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg),
                      scaler=torch.amp.GradScaler(env.device.type, enabled=amp.value is torch.float16),
                      autocast=autocast)
    return trainee, amp


def resume(trainee: Trainee, path: Path, cfg: TrainConfig, vocab: Vocabulary, env: DistEnv) -> TrainState:
    """Weights, optimizer, scaler, scheduler, position and RNG of the checkpoint at ``path``."""
    saved = load_checkpoint(path, map_location=env.device)
    check_compatible(saved, cfg, trainee.model.cfg, vocab, path, env)
    load_model_weights(trainee.model, saved["model"], path)  # a damaged file: which tensors, no traceback
    try:
        trainee.optimizer.load_state_dict(saved["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"cannot resume the optimizer from {path}: {e} (was --fine-tune-encoder "
                              "or --encoder-weights changed?)") from e
    if saved.get("scaler"):
        trainee.scaler.load_state_dict(saved["scaler"])
    restore_scheduler(trainee.scheduler, saved, cfg, env)
    state = TrainState(**saved["train_state"], history=saved.get("history", []))
    saved_world = int(saved.get("world_size") or env.world_size)
    if saved_world != env.world_size and state.batches_done:
        # Batch b of every rank covers positions [b*B*W, (b+1)*B*W) of the epoch's one permutation
        # (DistributedSampler), so the same samples done is a batch count scaled by W_old / W_new (rounded down:
        # at most one batch of samples is seen twice).
        done = state.batches_done * saved_world // env.world_size
        warn0(env, f"mid-epoch position: batch {state.batches_done} of {saved_world} process(es) = batch {done} "
                   f"of {env.world_size}")
        state.batches_done = done
    rngs = saved.get("rng") or []
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:
        seed_everything(cfg.seed + 1 + 7919 * env.rank + state.step)
    print0(env, f"resumed from {path}: epoch {state.epoch + 1}, batch {state.batches_done}, "
                f"step {state.step}, {state.train_seconds:.0f}s trained")
    return state


# ------------------------------------------------------------------------------------------------- train/evaluate
def step_loss(t: Trainee, batch, cfg: TrainConfig, state: TrainState) -> torch.Tensor:
    """The loss of one batch: cross-entropy, or SCST's policy gradient once its stage has begun."""
    if t.scst is not None and t.scst.active(state.step):
        return t.scst.loss(t.model, t.ddp, batch.images, batch.indices)
    logits, alphas = t.ddp(batch.images, batch.captions, batch.lengths, packed=True)  # no padding built or read
    return caption_loss(logits, batch.captions, batch.lengths, alphas, cfg.alpha_c)


def update(t: Trainee, mean_loss: float, cfg: TrainConfig, state: TrainState) -> None:
    """Apply the gradients of one step (already backpropagated); stop on a loss that cannot be trained on."""
    if not math.isfinite(mean_loss) and not t.scaler.is_enabled():
        raise TrainingError(
            f"the loss is {mean_loss} at step {state.step + 1} (epoch {state.epoch + 1}, batch "
            f"{state.batches_done + 1}) with amp={cfg.amp}: stopped before this update. The last checkpoint "
            f"holds finite weights. Try a lower --decoder-lr/--encoder-lr, --grad-clip, or --amp off.")
    t.scaler.unscale_(t.optimizer)
    clip_gradients(t.optimizer, cfg.grad_clip)
    scale = t.scaler.get_scale()  # (1.0 when the scaler is disabled: never "lowered" below)
    t.scaler.step(t.optimizer)  # fp16: skipped when the gradients overflowed
    t.scaler.update()
    if cfg.lr_schedule == "cosine":  # (plateau steps once per epoch, on val BLEU-4)
        t.scheduler.step()
    state.skipped_steps = state.skipped_steps + 1 if t.scaler.get_scale() < scale else 0
    if state.skipped_steps > cfg.max_skipped_steps:
        raise TrainingError(f"{state.skipped_steps} consecutive fp16 steps overflowed (last loss "
                            f"{mean_loss}): training diverged. Try --amp bf16 or off, or a lower lr.")
    state.step += 1
    state.batches_done += 1


@dataclass
class EpochMeter:
    """What an epoch's progress line, log line and TensorBoard say; ``timer`` splits the step's time."""

    timer: StepTimer
    loss_sum: float = 0.0
    steps: int = 0
    samples: int = 0  # images, all ranks
    captions: int = 0  # captions decoded, all ranks
    seconds: float = 0.0

    def rate(self, n: int) -> float:
        return n / max(self.seconds, 1e-9)


def report_step(bar, meter: EpochMeter, mean_loss: float, grad_norm: float, t: Trainee, cfg: TrainConfig,
                env: DistEnv, state: TrainState, num_batches: int, tb: TensorBoardLog) -> None:
    """Progress bar, a log line every --log-every steps (with where the time went), TensorBoard scalars."""
    bar.set_postfix(loss=f"{mean_loss:.3f}", samples_s=f"{meter.rate(meter.samples):.1f}", refresh=False)
    state.step_losses.append([round(state.epoch + state.batches_done / num_batches, 5), mean_loss])
    tb.step(state.step, mean_loss, t.optimizer.param_groups[0]["lr"], grad_norm, meter.rate(meter.captions),
            meter.timer.shares()["data"])
    if cfg.log_every and state.step % cfg.log_every == 0:
        line = meter.timer.line()  # (every rank starts a new interval; rank 0 prints it)
        if env.is_main and cfg.progress and not sys.stderr.isatty():
            print0(env, f"epoch {state.epoch + 1} batch {state.batches_done}/{num_batches} step {state.step} | "
                        f"loss {mean_loss:.3f} | {meter.rate(meter.samples):.1f} samples/s, "
                        f"{meter.rate(meter.captions):.1f} captions/s | time: {line}"
                        f"{t.scst.summary() if t.scst else ''}")


def train_one_epoch(t: Trainee, loader, cfg: TrainConfig, env: DistEnv, state: TrainState,
                    save_last: Callable[[], None], tb: TensorBoardLog | None = None) -> dict[str, Any]:
    """Train from ``state.batches_done`` to the end of ``state.epoch`` (or an earlier stop).

    Returns {"train_loss", "samples_per_s", "captions_per_s", "stop": None | "time budget" | "max steps"}. Stops
    with a TrainingError, on every rank together, before an update with a non-finite loss (fp16: after too many
    skips).
    """
    tb = tb or TensorBoardLog(Path(cfg.out), enabled=False)
    t.ddp.train()
    if not cfg.train_encoder:
        t.model.encoder.eval()  # frozen pretrained encoder: keep its BatchNorm statistics
    budget_s = cfg.time_budget * 60.0
    # A bar on a terminal; in a log file (stderr not a TTY) one line every --log-every steps instead.
    tty, show = sys.stderr.isatty(), env.is_main and cfg.progress
    bar = tqdm(loader.epoch(state.epoch, state.batches_done), total=loader.num_batches, initial=state.batches_done,
               unit="batch", desc=f"epoch {state.epoch + 1}", disable=not (show and tty), dynamic_ncols=True,
               file=sys.stderr)
    meter, stop = EpochMeter(StepTimer(t.model.encoder, env.device)), None
    tick = time.perf_counter()
    for batch in bar:
        meter.timer.mark("data")
        with t.autocast:
            loss = step_loss(t, batch, cfg, state)
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        meter.timer.mark("compute")
        over_budget = budget_s > 0 and state.train_seconds + (time.perf_counter() - tick) >= budget_s
        # One small collective per step: every rank sees the same mean loss and stop flag, so all stop together.
        reduced = all_reduce_mean(torch.stack([loss.detach().float(), torch.tensor(float(over_budget), device=loss.device)]))
        mean_loss, over_budget = float(reduced[0]), bool(reduced[1] > 0)
        meter.timer.mark("all-reduce")
        grad_norm = tb.grad_norm(t.optimizer, t.scaler.get_scale()) if tb.enabled else float("nan")
        update(t, mean_loss, cfg, state)
        meter.timer.mark("optimizer")
        if math.isfinite(mean_loss):
            meter.loss_sum, meter.steps = meter.loss_sum + mean_loss, meter.steps + 1
        meter.samples += batch.images.shape[0] * env.world_size  # every rank's batch has the same size
        meter.captions += batch.captions.shape[0] * env.world_size
        now = time.perf_counter()
        state.train_seconds += now - tick
        meter.seconds += now - tick
        report_step(bar, meter, mean_loss, grad_norm, t, cfg, env, state, loader.num_batches, tb)
        stop = "max steps" if cfg.max_steps and state.step >= cfg.max_steps else "time budget" if over_budget else None
        if cfg.save_every and state.step % cfg.save_every == 0 and not stop:  # (a stop saves after its eval)
            broadcast_buffers(t.model)
            save_last()
        tick = time.perf_counter()  # checkpoint time is not training time
        meter.timer.skip()
        if stop:
            break
    bar.close()
    meter.timer.close()
    return {"train_loss": meter.loss_sum / meter.steps if meter.steps else float("nan"),
            "samples_per_s": meter.rate(meter.samples), "captions_per_s": meter.rate(meter.captions), "stop": stop}


# ---------------------------------------------------------------------------------------------------------- run
def record(state: TrainState, stats: dict, m: dict, full_epoch: bool, epoch_pos: float, lr: float) -> bool:
    """Update the state after an evaluation; True when val BLEU-4 improved."""
    improved = m["bleu4"] > state.best_bleu4
    if full_epoch:  # partial epochs (a stop) do not count for early stopping
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
    state.history.append({
        "epoch": round(epoch_pos, 3), "step": state.step, "train_loss": stats["train_loss"], "val_loss": m["loss"],
        **{k: m[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}, "lr": lr,
        "samples_per_s": stats["samples_per_s"], "elapsed": state.train_seconds,
    })
    if improved:
        state.best_bleu4, state.best_epoch = m["bleu4"], epoch_pos
    return improved


def fit(t: Trainee, loaders: Loaders, ckpt: Checkpointer, vocab: Vocabulary, cfg: TrainConfig, env: DistEnv,
        state: TrainState, tb: TensorBoardLog | None = None) -> None:
    """Epochs of training, each followed by validation and a checkpoint, until a stop."""
    tb = tb or TensorBoardLog(Path(cfg.out), enabled=False)

    def save(names: list[str]) -> None:
        ckpt.save(names, t.checkpoint(vocab, state, cfg, env))

    budget_s = cfg.time_budget * 60.0
    while state.epoch < cfg.epochs:
        if (budget_s and state.train_seconds >= budget_s) or (cfg.max_steps and state.step >= cfg.max_steps):
            break
        stats = train_one_epoch(t, loaders.train, cfg, env, state, lambda: save(["last.pt"]), tb)
        full_epoch = state.batches_done >= loaders.train.num_batches
        if full_epoch:
            state.epoch, state.batches_done = state.epoch + 1, 0
        t0 = time.perf_counter()
        m = validate(t.model, t.autocast, loaders, vocab, cfg, env, state.epoch)
        if full_epoch and cfg.lr_schedule == "plateau":
            t.scheduler.step(m["bleu4"])
        lr = t.optimizer.param_groups[0]["lr"]
        epoch_pos = state.epoch + state.batches_done / loaders.train.num_batches
        improved = record(state, stats, m, full_epoch, epoch_pos, lr)
        tb.evaluation(state.step, m)
        tb.attention(state.step, t.model, t.autocast)
        save(["best.pt", "last.pt"] if improved else ["last.pt"])
        if env.is_main:
            write_metrics_csv(Path(cfg.out) / "metrics.csv", state.history)
        print0(env, f"epoch {epoch_pos:.2f}/{cfg.epochs} step {state.step} | train loss {stats['train_loss']:.3f} | "
                    f"val {fmt_metrics(m)} | lr {lr:.2g} | {stats['samples_per_s']:.1f} samples/s "
                    f"({stats['captions_per_s']:.1f} captions/s) | "
                    f"trained {state.train_seconds:.0f}s | eval {time.perf_counter() - t0:.0f}s"
                    f"{' | best' if improved else ''}")
        if stats["stop"] == "time budget" and cfg.max_steps:
            warn0(env, f"the wall-clock cap (--time-budget {cfg.time_budget:g} min) cut training short at step "
                       f"{state.step} of --max-steps {cfg.max_steps}: the model may fall short of its usual quality")
        if stats["stop"]:
            print0(env, f"stopping: {stats['stop']} reached")
            break
        if cfg.early_stop and state.bad_epochs >= cfg.early_stop:
            print0(env, f"early stop: no better val BLEU-4 for {state.bad_epochs} epochs")
            break


def feature_cache(t: Trainee, data: CaptionDataset, cfg: TrainConfig, env: DistEnv, amp: hardware.Choice):
    """The train split's cached encoder outputs (--feature-cache with a frozen encoder), else None."""
    if cfg.feature_cache == "none":
        return None
    if not cfg.uses_feature_cache:
        warn0(env, "--feature-cache is not used: the encoder trains (--fine-tune-encoder, or no pretrained weights), "
                   "so its output changes at every step; training reads images")
        return None
    if cfg.random_crop or cfg.hflip:
        print0(env, "augmentation off: the feature cache holds each image's features under the eval transform "
                    "(no random crop or flip)")
    return open_feature_cache(t.model, data, "train", cfg.feature_cache, cfg.feature_cache_dtype,
                              hardware.dtype_name(amp.value), t.autocast, env, cfg.eval_batch_size,
                              default_workers("torch", env, cfg.workers, cfg.deterministic))


def prepare_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
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
    return out


def run(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """Everything from data to test metrics: {"state", "model" (the trained module), "test"}.

    The DDP wrapper and the optimizer live and die in this function (they must be gone before the process group
    is destroyed).
    """
    data, vocab = load_data(cfg, env)  # before --out exists: a bad --data leaves no empty run directory behind
    out = prepare_run_dir(cfg, env)
    print0(env, f"hardware: {hardware.summary()}")
    t, amp = build_trainee(cfg, vocab, env)
    ckpt = Checkpointer(out, env)
    ckpt.remove_stale_temporaries()
    resume_path = ckpt.find(cfg.resume, fits=tensors_fit(t.model, t.model.cfg))
    state = resume(t, resume_path, cfg, vocab, env) if resume_path is not None else TrainState()
    cache = feature_cache(t, data, cfg, env, amp)
    trained = t.model if cache is None else t.model.decoder  # from cached features: the decoder alone
    t.ddp = DDP(trained, device_ids=[env.local_rank] if env.device.type == "cuda" else None) if env.distributed \
        else trained
    loaders = build_loaders(cfg, data, vocab, env, cache)
    if cfg.scst or cfg.scst_after:
        t.scst = Scst.from_config(cfg, loaders.train.table, vocab)
        if cfg.scst and not cfg.init_from and resume_path is None:
            warn0(env, "--scst from randomly initialized weights: start from a cross-entropy model (--init-from PATH "
                       "or --resume), or use --scst-after N")
        print0(env, f"SCST from step {t.scst.start_step}: {cfg.scst_samples} samples per image, {cfg.scst_baseline} "
                    f"baseline, reward {cfg.scst_cider_weight:g} x CIDEr-D + {cfg.scst_bleu_weight:g} x BLEU-4")
    if env.is_main:
        vocab.save(out / "vocab.json")
        cfg.save(out / "config.json", world_size=env.world_size, device=str(env.device), loader=loaders.kind,
                 workers=loaders.workers, amp_dtype=hardware.dtype_name(amp.value), amp_reason=amp.reason,
                 hardware=hardware.summary(), threads=torch.get_num_threads(), torch=torch.__version__,
                 resumed_from=str(resume_path or ""), splits=data.splits.sizes(), vocab_size=len(vocab))
    print0(env, f"amp {hardware.dtype_name(amp.value)}: {amp.reason}")
    print0(env, f"{env.world_size} process(es) on {env.device} | loader {loaders.kind} ({loaders.workers} workers)"
                f"{', training from the feature cache' if cache is not None else ''} | "
                f"{sum(p.numel() for p in t.model.parameters() if p.requires_grad) / 1e6:.2f}M trained params | "
                f"splits {data.splits.sizes()} | vocab {len(vocab)} | "
                f"{loaders.train.num_batches} batches/epoch of {cfg.batch_size}x{env.world_size} images, "
                f"{loaders.captions_per_image} caption(s) each")
    tb = TensorBoardLog(out, env.is_main and cfg.tensorboard, (data, vocab, data.splits["val"][: cfg.num_examples],
                                                                cfg.test_beam_size, cfg.max_decode_len))
    try:
        fit(t, loaders, ckpt, vocab, cfg, env, state, tb)
    finally:
        tb.close()
    loaders.close()
    model, autocast = t.model, t.autocast
    del t  # the DDP wrapper must be gone before the process group is destroyed
    result: dict[str, Any] = {"state": state, "model": model}
    if cfg.final_eval:
        result["test"] = final_evaluation(model, data, vocab, cfg, env, autocast, loaders, state)
    return result


def final_evaluation(model: CaptionModel, data: CaptionDataset, vocab: Vocabulary, cfg: TrainConfig, env: DistEnv,
                     autocast, loaders: Loaders, state: TrainState) -> dict[str, Any]:
    """Test metrics of best.pt (beam --test-beam-size), the learning curve and captioned val examples."""
    out = Path(cfg.out)
    source, weights_step = "final weights", state.step
    if (out / "best.pt").is_file():
        saved = load_checkpoint(out / "best.pt", map_location=env.device)
        model.load_state_dict(saved["model"])
        source = f"best.pt (epoch {state.best_epoch:g}, val BLEU-4 {state.best_bleu4:.4f})"
        weights_step = int(saved["step"])
        del saved
    test = {}
    if data.splits["test"]:
        table = data.caption_table("test", vocab, max_len=cfg.max_caption_len)
        loader = EvalLoader(data, table, cfg.model.image_size, cfg.eval_batch_size, env, loaders.kind, loaders.workers, "test")
        t0 = time.perf_counter()
        m = evaluate(model, loader, table, vocab, autocast, cfg, env, cfg.test_beam_size)
        loader.close()
        test = {k: m[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "loss", "images")}
        test.update(beam_size=cfg.test_beam_size, weights=source, weights_step=weights_step, steps=state.step,
                    train_seconds=round(state.train_seconds, 1), eval_seconds=round(time.perf_counter() - t0, 1))
        print0(env, f"test ({test['images']} images, beam {cfg.test_beam_size}, {source}): {fmt_metrics(m)}")
        if env.is_main:  # the numbers papers report: COCO caption metrics of test_results.json
            test.update(coco_test_metrics(coco_results(m["hypotheses"], table.names, vocab), data.captions, out,
                                          cfg.coco_eval))
            print0(env, fmt_coco(test))
    if env.is_main:
        if test:
            atomic_write_text(out / "test_metrics.json", json.dumps(test, indent=1) + "\n")
        write_learning_curve(state.history, out / "learning_curve.png", title=f"{cfg.model.backbone} on {cfg.data}",
                             step_losses=state.step_losses)
        write_examples(model, data, vocab, data.splits["val"][: cfg.num_examples], cfg.test_beam_size,
                       cfg.max_decode_len, autocast, out / "examples")
        print0(env, f"outputs in {out}/: best.pt last.pt metrics.csv learning_curve.png test_metrics.json examples/")
    return test


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, prog="distributed/train.py", description=__doc__)
    env = setup_distributed(threads=cfg.threads, timeout_s=cfg.dist_timeout)
    log = setup_logging("train", verbosity_from(argv), env.rank, env.world_size, info_stream=sys.stdout)
    log_round(env)
    code = 0
    try:
        run(cfg, env)
    except (DatasetNotFoundError, DataFormatError) as e:  # the same on every rank: said once, by rank 0
        if env.is_main:
            log.error(f"error: {e}\nno dataset yet? `./launch.sh demo` generates a synthetic one in the Flickr8k "
                      f"layout and trains on it.")
        code = 2
    except (ImageLoadError, SkipListError) as e:  # may concern one rank's images only: said by that rank
        log.error(f"error: {e}\nrun `python -m core.data check {cfg.data}`: it lists every bad file and writes the "
                  f"skip list that training reads")
        code = 2
    except (TrainingError, CheckpointError, PretrainedWeightsError, FeatureCacheError) as e:  # every rank holds the same state
        if env.is_main:
            log.error(f"error: {e}")
        code = 1
    except WriteError as e:
        log.error(f"error: {e}")
        code = 1
    # Leaving the except blocks released the traceback, and with it run()'s frame (the DDP model, the optimizer).
    cleanup(barrier=code == 0)  # after an error the other ranks may never reach a barrier
    return code


if __name__ == "__main__":
    sys.exit(main())
