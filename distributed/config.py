"""Training configuration: one dataclass is the source of truth, argparse flags are generated from it.

    cfg = parse_config(["--data", "Flickr8k", "--preset", "demo", "--batch-size", "16"])

Every field of :class:`TrainConfig` becomes a kebab-case flag (``decoder_lr`` -> ``--decoder-lr``) with the
field's help text; booleans get ``--flag/--no-flag``. The model's shape is a nested ``core.model.ModelConfig``
(``cfg.model``) whose fields are flags too (``--backbone``, ``--image-size``, ...); its ``vocab_size`` comes from
the data. ``--preset NAME`` replaces the defaults with the preset's values first, so any flag given explicitly
still wins. The resolved config is saved as ``config.json`` in the run directory and read back with
``TrainConfig.from_dict``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from core.cli import flag_field as _f
from core.logs import add_verbosity_args
from core.model import ModelConfig


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ data
    data: str = _f("Flickr8k", "dataset directory: Images/ + Flickr8k.token.txt, or a Flickr30k/COCO directory with "
                               "Karpathy's dataset_*.json (see --dataset; synthetic: ./launch.sh demo)")
    dataset: str = _f("auto", "the layout of --data: flickr8k (Images/ + Flickr8k.token.txt), flickr30k "
                              "(dataset_flickr30k.json + flickr30k-images/), coco (dataset_coco.json + train2014/ "
                              "val2014/); auto: from the files present", ["auto", "flickr8k", "flickr30k", "coco"])
    karpathy_json: str | None = _f(None, "take captions and splits from this Karpathy file (dataset_*.json)")
    split_seed: int = _f(0, "seed of the random train/val/test split (when there are no official split files)")
    val_frac: float = _f(0.1, "fraction of images in val (random split)")
    test_frac: float = _f(0.1, "fraction of images in test (random split)")
    min_word_freq: int = _f(5, "words seen fewer times in the train captions become <unk>")
    max_caption_len: int = _f(52, "captions are cut to this many tokens incl. <start>/<end>")
    skip_list: str = _f("auto", "images to leave out, from `python -m core.data check DATA` (auto: DATA/skip_list.json "
                        "if present; none; or a PATH)")
    out: str = _f("runs/train", "run directory: checkpoints, config.json, vocab.json, metrics.csv, figures")
    # ------------------------------------------------------------------ model
    model: ModelConfig = field(default_factory=ModelConfig,  # vocab_size: set from the data when the model is built
                               metadata={"help": "the model's shape", "skip": ("vocab_size",)})
    encoder_weights: str = _f(
        "imagenet",
        "imagenet (torchvision weights, needs the file or network), none (train the whole encoder from "
        "scratch), or the PATH of a torchvision ResNet state_dict",
    )
    fine_tune_encoder: bool = _f(False, "with pretrained weights: also train conv blocks 2-4 of the encoder")
    init_from: str = _f("", "start from the weights of this checkpoint (ours, or one written by "
                            "python -m core.import_tutorial): every weight whose shape fits, the word rows mapped "
                            "onto this run's vocabulary, a fresh optimizer; its encoder counts as pretrained")
    # ------------------------------------------------------------------ optimization
    epochs: int = _f(20, "maximum number of epochs")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0: no limit)")
    batch_size: int = _f(32, "images per process per step (global batch = batch_size x processes)")
    captions_per_image: int = _f(0, "captions decoded per image per step: 1 (one of its captions, another each "
                                    "epoch: the tutorial's) or k (k of them on the same image features: the encoder "
                                    "and the attention projection run once for k captions' worth of supervision); 0: "
                                    "every caption of the image (5 in Flickr/COCO) when the encoder is frozen or "
                                    "cached, 1 when it trains. A step then holds batch_size x k captions and the loss "
                                    "is their mean, so the learning rate keeps its meaning (per-caption gradient "
                                    "scale) and an epoch has as many steps as with k=1, each seeing k times the "
                                    "captions")
    decoder_lr: float = _f(4e-4, "Adam learning rate of the decoder")
    encoder_lr: float = _f(1e-4, "Adam learning rate of the encoder (when it is trained)")
    grad_clip: float = _f(5.0, "clip each gradient value to [-grad_clip, grad_clip] (0: off)")
    alpha_c: float = _f(1.0, "weight of the doubly stochastic attention regularizer")
    lr_schedule: str = _f("plateau", "plateau: ReduceLROnPlateau on val BLEU-4 (the tutorial's); cosine: linear "
                                     "warm-up then cosine decay to 0 at --max-steps (needs --max-steps)",
                          ["plateau", "cosine"])
    warmup_steps: int = _f(0, "cosine: optimizer steps of linear learning-rate warm-up")
    lr_factor: float = _f(0.8, "ReduceLROnPlateau factor (on val BLEU-4)")
    lr_patience: int = _f(3, "epochs without a better val BLEU-4 before the learning rates are reduced")
    early_stop: int = _f(10, "stop after this many epochs without a better val BLEU-4 (0: never)")
    amp: str = _f("auto", "autocast dtype: auto = bf16 where the hardware runs it natively (CPUs with AVX-512 BF16 "
                          "or AMX, GPUs sm80+), fp16 + GradScaler on older GPUs, else fp32 (see ./launch.sh doctor)",
                  ["auto", "bf16", "fp16", "off"])
    max_skipped_steps: int = _f(25, "fp16: stop when this many consecutive steps overflow (GradScaler skips)")
    # ------------------------------------------------------------------ data loading
    loader: str = _f("auto", "auto = dali when nvidia.dali imports, else torch", ["auto", "dali", "torch"])
    workers: int = _f(-1, "DataLoader workers / DALI threads per process (-1: from the cores per process)")
    threads: int = _f(0, "torch CPU threads per process (0: the cores divided by the processes on this machine)")
    random_crop: bool = _f(True, "train on random crops (resize to 1.125x, crop); off: the eval transform (the "
                                 "synthetic demo: its captions name positions up to the borders, which a crop can cut)")
    hflip: bool = _f(False, "random horizontal flips (off: the captions state left/right relations)")
    channels_last: bool = _f(True, "channels-last memory format for the CNN (faster convolutions on CPU and GPU)")
    # ------------------------------------------------------------------ evaluation
    precise_bn: int = _f(20, "before each evaluation, recompute the trained encoder's BatchNorm statistics over "
                             "this many train batches per process (0: keep the running averages, which can lag far "
                             "behind weights that change fast)")
    val_beam_size: int = _f(3, "beam size of the per-epoch val BLEU")
    test_beam_size: int = _f(3, "beam size of the final test metrics")
    max_decode_len: int = _f(50, "longest generated caption (words)")
    val_max_images: int = _f(0, "score val BLEU on at most this many val images (0: all)")
    eval_batch_size: int = _f(64, "images per process per evaluation batch")
    final_eval: bool = _f(True, "at the end: test metrics, learning curve, captioned val images")
    coco_eval: bool = _f(True, "at the end: the COCO caption metrics (pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, "
                               "CIDEr-D, SPICE when installed) of test_results.json, the numbers papers report")
    num_examples: int = _f(4, "captioned val images with attention figures written at the end")
    # ------------------------------------------------------------------ self-critical sequence training (docs/scst.md)
    scst: bool = _f(False, "train by self-critical sequence training (CIDEr-D reward, policy gradient) instead of "
                           "cross-entropy: start from a cross-entropy model (--init-from, or --resume); the "
                           "reference lr is 5e-5 (--decoder-lr)")
    scst_after: int = _f(0, "switch from cross-entropy to SCST once this many optimizer steps are done (0: never; "
                            "--scst: from the start)")
    scst_samples: int = _f(5, "captions sampled per image per SCST step (all in one batched pass)")
    scst_baseline: str = _f("greedy", "the reward subtracted from each sample's: greedy (the greedy caption's, "
                                      "Rennie et al.) or mean (the mean of the image's other samples)",
                            ["greedy", "mean"])
    scst_cider_weight: float = _f(1.0, "weight of CIDEr-D (document frequencies of the train split) in the reward")
    scst_bleu_weight: float = _f(0.0, "weight of sentence BLEU-4 in the reward")
    scst_alpha_c: float = _f(0.0, "weight of the doubly stochastic attention regularizer during SCST (0: off)")
    # ------------------------------------------------------------------ run control
    seed: int = _f(42, "random seed (model init, sampling order, caption choice, augmentation)")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms, 0 workers: bit-exact resume")
    time_budget: float = _f(0.0, "a cap on the minutes of training (eval and checkpoint time excluded); then a clean "
                                 "stop with the final evaluation (0: no limit). --max-steps sets the work; this only "
                                 "bounds the wall time on a slow or busy machine")
    save_every: int = _f(0, "also write last.pt every N optimizer steps (0: at the end of each epoch only)")
    dist_timeout: float = _f(1800.0, "seconds a process waits for the others (meeting them after a (re)start, every "
                                     "collective) before it fails; torchrun then restarts the round "
                                     "(--max-restarts), so a hung or stopped process costs this long, not forever")
    resume: str = _f("auto", "auto (newest loadable checkpoint in --out, if any), none, or a checkpoint PATH")
    progress: bool = _f(True, "progress on rank 0: a bar on a terminal, else a line every --log-every steps")
    log_every: int = _f(50, "progress line every N optimizer steps when stderr is not a terminal (0: none)")
    # ------------------------------------------------------------------ frozen-encoder feature cache, monitoring
    feature_cache: str = _f("none", "with a frozen encoder: compute its output once per image and train from those "
                                    "features (no JPEG decoding, no encoder pass per step; augmentation off): a "
                                    "DIR, auto (DATA/.feature_cache if writable, else ~/.cache/sat/features), or "
                                    "none. Reused across epochs and runs, rebuilt when the encoder weights, the "
                                    "preprocessing or the image files change. Not used with --fine-tune-encoder")
    feature_cache_dtype: str = _f("fp16", "how cached features are stored: fp16 (half the disk of fp32, ~1e-3 "
                                          "relative error), bf16 (the range of fp32, ~4e-3 relative error), fp32",
                                  ["fp16", "bf16", "fp32"])
    tensorboard: bool = _f(True, "TensorBoard event files in --out/tensorboard (rank 0): per-step loss, lr, gradient "
                                 "norm, captions/s, data-wait share; per-epoch val metrics and attention figures")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.captions_per_image < 0:
            raise ValueError(f"captions_per_image must be >= 0 (0: all of an image's), got {self.captions_per_image}")
        positive = ("epochs", "batch_size", "val_beam_size", "test_beam_size", "max_decode_len",
                    "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.dist_timeout > 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.max_caption_len < 3:
            raise ValueError(f"max_caption_len must be >= 3, got {self.max_caption_len}")
        if self.lr_schedule == "cosine" and self.max_steps < 1:
            raise ValueError("--lr-schedule cosine decays to 0 at --max-steps: give --max-steps N")
        if self.hflip and not self.random_crop:
            raise ValueError("--hflip is part of the random-crop augmentation; it needs --random-crop")
        if self.fine_tune_encoder and not self.encoder_pretrained:
            raise ValueError("--fine-tune-encoder is for pretrained weights; with --encoder-weights none "
                             "the whole encoder is trained anyway")
        self._check_scst()

    def _check_scst(self) -> None:
        if self.scst_samples < 1 or (self.scst_baseline == "mean" and self.scst_samples < 2):
            raise ValueError(f"scst_samples must be >= 1 (>= 2 with --scst-baseline mean), got {self.scst_samples}")
        if self.scst_after < 0 or self.scst_cider_weight < 0 or self.scst_bleu_weight < 0:
            raise ValueError("--scst-after and the SCST reward weights must be >= 0")

    @property
    def encoder_pretrained(self) -> bool:
        return self.encoder_weights != "none" or bool(self.init_from)

    @property
    def train_encoder(self) -> bool:
        """A random encoder must learn everything; a pretrained one only when fine-tuning."""
        return not self.encoder_pretrained or self.fine_tune_encoder

    @property
    def uses_feature_cache(self) -> bool:
        """--feature-cache applies only to a frozen encoder: a trained one changes its output every step."""
        return self.feature_cache != "none" and not self.train_encoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict`` (``config.json``, a checkpoint's ``train_config``); ``resolved`` values are
        ignored."""
        d = {k: v for k, v in d.items() if k != "resolved"}
        model = d.pop("model", {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}")
        return cls(**d, model=ModelConfig.from_dict({**model, "vocab_size": None}))

    def save(self, path: str | Path, **resolved: Any) -> None:
        """Write the config (and the values resolved at run time, e.g. the AMP dtype) as JSON."""
        from core.fileio import atomic_write_text

        atomic_write_text(path, json.dumps({**self.to_dict(), "resolved": resolved}, indent=1) + "\n")


# Presets replace the defaults; flags given on the command line still override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The synthetic demo on a 2-core CPU: ResNet-18 trained from scratch at 96 px, whose 3x3 feature grid matches
    # the scenes' 3x3 layout. Its budget is a number of optimizer steps, so its quality does not depend on how fast
    # or busy the machine is; the wall-clock budget is only a safety cap (a warning says when it cut training
    # short). Precision comes from the hardware (--amp auto: bf16 only where the CPU runs it natively). Adam at 2e-3
    # for both parts (the encoder learns from scratch) with warm-up and cosine decay, light dropout, no random crop
    # (the captions name positions up to the image borders, which a crop can cut away). All 5 captions of each
    # image are decoded on one encoder pass (a step costs little more than a one-caption step, and learns far more),
    # and the batch is small (8 images per process): for the same images seen, more updates gave a better held-out
    # BLEU-4 (docs/training.md). Its encoder trains, so the feature cache (frozen encoders only) does not apply.
    "demo": dict(
        model=dict(backbone="resnet18", image_size=96, encoded_size=3, attention_dim=256, embed_dim=256,
                   decoder_dim=256, dropout=0.1),
        encoder_weights="none",
        batch_size=8,
        captions_per_image=5,
        decoder_lr=2e-3,
        encoder_lr=2e-3,
        lr_schedule="cosine",
        warmup_steps=60,
        max_steps=600,
        random_crop=False,
        min_word_freq=1,
        epochs=100,
        time_budget=12.0,
        early_stop=0,
        save_every=100,
        val_max_images=200,
        num_examples=4,
    ),
    # A few steps on tiny data: for tests and smoke runs.
    "tiny": dict(
        model=dict(backbone="resnet18", image_size=64, encoded_size=2, attention_dim=32, embed_dim=32, decoder_dim=32),
        encoder_weights="none",
        batch_size=8,
        min_word_freq=1,
        epochs=1,
        eval_batch_size=16,
        max_decode_len=20,
        num_examples=1,
        coco_eval=False,  # METEOR's Java start-up would dominate a test run; tests that need it turn it on
    ),
}


def _field_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of a resolved annotation such as ``int`` or ``str | None``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, group: str | None = None, prefix: str = "",
                       skip: Sequence[str] = ()) -> None:
    """Add one kebab-case flag per field of dataclass ``cls`` (bools: ``--x/--no-x``), help from metadata.

    A field that is itself a dataclass adds its own fields as flags of the same flat name, with ``dest``
    ``"<field>.<name>"`` (``--backbone`` -> ``args.__dict__["model.backbone"]``). ``skip`` names fields left out.
    """
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _field_type(hints[f.name])
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(tp):
            add_dataclass_args(parser, tp, f.metadata.get("help"), f"{prefix}{f.name}.", f.metadata.get("skip", ()))
            continue
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = dict(dest=prefix + f.name, default=f.default, help=f"{help_text} (default: %(default)s)")
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = f.name.upper() if not f.metadata.get("choices") else None
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
        target.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, prefix: str = "") -> Any:
    """The dataclass ``cls`` from the flags ``add_dataclass_args`` added (nested dataclasses from their dests)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        tp, _ = _field_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            values[f.name] = config_from_args(args, tp, f"{prefix}{f.name}.")
        elif hasattr(args, prefix + f.name):
            values[f.name] = getattr(args, prefix + f.name)
    return cls(**values)


def flat_defaults(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"backbone": x}, "epochs": 1}`` -> the argparse dests ``{"model.backbone": x, "epochs": 1}``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        out.update(flat_defaults(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from these defaults (flags given explicitly still win): "
                        + "; ".join(f"{name}: " + ", ".join(f"{dest.split('.')[-1]}={value}"
                                                            for dest, value in flat_defaults(preset).items())
                                    for name, preset in PRESETS.items()))
    add_dataclass_args(parser, TrainConfig)
    add_verbosity_args(parser)
    return parser


def parse_config(argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> TrainConfig:
    parser = build_parser(prog, description)
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**flat_defaults(PRESETS[known.preset]))
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
