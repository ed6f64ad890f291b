"""Import a checkpoint of the PyTorch tutorial (a-PyTorch-Tutorial-to-Image-Captioning), running none of its pickle.

    python -m core.import_tutorial BEST_checkpoint_flickr8k_5_cap_per_img_5_min_word_freq.pth.tar \\
        WORDMAP_flickr8k_5_cap_per_img_5_min_word_freq.json --out runs/tutorial/model.pt

The tutorial's train.py saves whole modules and optimizers with torch.save, i.e. pickles that name classes to
rebuild (``models.Encoder``, ``models.DecoderWithAttention``, torch.nn layers, ``torch.optim.Adam``). Loading
such a file with plain pickle would run whatever callables it names. Here it is read with torch's
``weights_only`` unpickler, with each class the tutorial's file may name registered as an inert stand-in: an
object that only receives the pickled attributes, from which the parameters and buffers are collected. Any
other global (``os.system``, ``builtins.eval``, a class the tutorial never saves) is refused before anything is
called, with one error line naming the file.

What is mapped:
- weights: the tutorial's parameter names are ours (core/model.py), so the state dicts load as they are;
- vocabulary: the word map numbers words 1..n, then <unk>, <start>, <end> (and <pad> = 0); ours has <pad> 0,
  <start> 1, <end> 2, <unk> 3, then the words in the word map's order. The rows of ``embedding`` and ``fc``
  (weight and bias) are permuted to match;
- model config: the backbone from the encoder's blocks (ResNet-101 in the tutorial), the grid size from the
  pickled Encoder (14), the dimensions from the weight shapes, dropout from the pickled Dropout; image size 256;
- decoding: max_len 51, the tutorial caption.py's limit (``if step > 50: break`` follows its 51st step: captions
  of up to 50 words and <end>). ``python -m export.caption --search tutorial`` reproduces its captions.

The output is one of our checkpoints (core/checkpoint.py), with max_len 51 recorded, read by export/to_onnx.py
(which records that length in the export) and ``export.caption --backend eager``. It carries no optimizer state: training does not resume from it.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import CheckpointError, load_model_weights, make_checkpoint, save_checkpoint
from core.fileio import UnsafeTorchError, load_weights_only, read_json, sha256_file
from core.model import BACKBONE_CHANNELS, CaptionModel, ModelConfig
from core.vocab import SPECIALS, Vocabulary

TUTORIAL_IMAGE_SIZE = 256
TUTORIAL_MAX_LEN = 51  # caption.py: `if step > 50: break` after its step, so up to 51 steps

# Every class a tutorial checkpoint pickles: its own modules, the torch.nn and torchvision layers they hold (old
# and new module paths), the optimizer. Each becomes an inert stand-in; nothing else may appear.
TUTORIAL_CLASSES = (
    "models.Encoder", "models.DecoderWithAttention", "models.Attention",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d", "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.linear.Linear", "torch.nn.modules.sparse.Embedding", "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.rnn.LSTMCell", "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.activation.Softmax",
    "torchvision.models.resnet.Bottleneck", "torchvision.models.resnet.BasicBlock",
    "torch.nn.parallel.data_parallel.DataParallel", "torch.optim.adam.Adam",
)
# ResNet blocks per stage -> backbone (block type: bottleneck blocks have a conv3).
RESNETS = {
    ("basic", (2, 2, 2, 2)): "resnet18", ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50", ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}


class TutorialImportError(RuntimeError):
    """The files are not a usable tutorial checkpoint and word map (the message names the file and why)."""


# ------------------------------------------------------------------------------------------------- unpickling
class Pickled:
    """Inert stand-in for an allowed class: unpickling only sets its attributes (no __init__, no __setstate__)."""

    pickled_as = ""

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_as}>"


def _stand_in(name: str) -> type:
    return type(name.rpartition(".")[2], (Pickled,), {"pickled_as": name, "__module__": __name__})


def _plain_dict(*_args: Any) -> dict:
    """Stands in for collections.defaultdict (the optimizer's state) and its factory: a plain dict."""
    return {}


def _no_backend(*_args: Any) -> None:
    """Stands in for torch 0.4's ``torch.nn.backends.thnn._get_thnn_function_backend`` (a module attribute)."""
    return None


STAND_INS = {name: _stand_in(name) for name in TUTORIAL_CLASSES}
SAFE_GLOBALS = [(cls, name) for name, cls in STAND_INS.items()] + [
    (_plain_dict, "collections.defaultdict"), (_plain_dict, "builtins.dict"),
    (_no_backend, "torch.nn.backends.thnn._get_thnn_function_backend"),
]


def read_tutorial_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True and the stand-ins allowed: pickled code is refused, never called."""
    if not path.is_file():
        raise TutorialImportError(f"tutorial checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = load_weights_only(path, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise TutorialImportError(f"refusing to import {path}: {_refusal(str(e))}; nothing in it was run") from None
    except UnsafeTorchError as e:  # the file may be fine: the torch release is not
        raise TutorialImportError(str(e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise TutorialImportError(f"{path} is not a readable PyTorch checkpoint: {_first_line(str(e))}") from None
    if not isinstance(ckpt, dict) or "encoder" not in ckpt or "decoder" not in ckpt:
        what = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TutorialImportError(f"{path} is not a tutorial checkpoint: expected a dict with 'encoder' and "
                                  f"'decoder', got {what}")
    return ckpt


def _refusal(message: str) -> str:
    """The reason in torch's multi-paragraph weights_only error, as a short phrase."""
    m = re.search(r"GLOBAL (\S+) (was not an allowed global|whose module \S+ is blocked)", message)
    if m:
        return f"it names {m.group(1)}, which a tutorial checkpoint does not hold (possibly code that would run)"
    m = re.search(r"WeightsUnpickler error:(.+?)(Check the documentation|$)", message, re.S)
    detail = " ".join(m.group(1).split()) if m else _first_line(message)
    return f"it is not a pickle of a tutorial checkpoint ({detail})"


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), message)


# -------------------------------------------------------------------------------------------------- weights
def module_state(obj: Any, prefix: str = "") -> dict[str, Tensor]:
    """The state_dict of a pickled module: parameters, persistent buffers and submodules, recursively."""
    state: dict[str, Tensor] = {}
    skip = getattr(obj, "_non_persistent_buffers_set", set())
    for name, p in getattr(obj, "_parameters", {}).items():
        if p is not None:
            state[prefix + name] = p.detach()
    for name, b in getattr(obj, "_buffers", {}).items():
        if b is not None and name not in skip:
            state[prefix + name] = b
    for name, child in getattr(obj, "_modules", {}).items():
        if child is not None:
            state.update(module_state(child, f"{prefix}{name}."))
    return state


def _state_dict(ckpt: dict, key: str, expected: str, path: Path) -> tuple[dict[str, Tensor], Any]:
    """ckpt[key] as a state dict, and the pickled module (None where the file holds a state dict)."""
    obj = ckpt[key]
    if isinstance(obj, STAND_INS["torch.nn.parallel.data_parallel.DataParallel"]):
        obj = obj._modules["module"]
    if isinstance(obj, Pickled):
        if obj.pickled_as != expected:
            raise TutorialImportError(f"{path}: '{key}' is a {obj.pickled_as}, expected the tutorial's {expected}")
        return module_state(obj), obj
    if isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values()):
        return {k.removeprefix("module."): v for k, v in obj.items()}, None
    raise TutorialImportError(f"{path}: '{key}' is neither a pickled {expected} nor a state dict")


def infer_backbone(encoder: Mapping[str, Tensor], source: Path) -> str:
    """ResNet depth from the blocks of stages resnet.4 .. resnet.7 (layer1 .. layer4)."""
    blocks = []
    for stage in range(4, 8):
        ids = {int(k.split(".")[2]) for k in encoder if k.startswith(f"resnet.{stage}.")}
        blocks.append(max(ids) + 1 if ids else 0)
    kind = "bottleneck" if any(".conv3." in k for k in encoder) else "basic"
    backbone = RESNETS.get((kind, tuple(blocks)))
    if backbone is None:
        raise TutorialImportError(f"{source}: the encoder is not a torchvision ResNet we know ({kind} blocks "
                                  f"{blocks} per stage; known: {sorted(RESNETS.values())})")
    return backbone


def infer_config(encoder: Mapping[str, Tensor], decoder: Mapping[str, Tensor], encoded_size: int, dropout: float,
                 source: Path) -> ModelConfig:
    try:
        vocab_size, embed_dim = decoder["embedding.weight"].shape
        attention_dim, encoder_dim = decoder["attention.encoder_att.weight"].shape
        decoder_dim = decoder["init_h.weight"].shape[0]
    except KeyError as e:
        raise TutorialImportError(f"{source}: the decoder has no {e.args[0]}: not the tutorial's "
                                  "DecoderWithAttention") from None
    backbone = infer_backbone(encoder, source)
    if BACKBONE_CHANNELS[backbone] != encoder_dim:
        raise TutorialImportError(f"{source}: the decoder attends over {encoder_dim} channels but a {backbone} "
                                  f"encoder gives {BACKBONE_CHANNELS[backbone]}")
    return ModelConfig(vocab_size=vocab_size, backbone=backbone, encoded_size=encoded_size,
                       image_size=TUTORIAL_IMAGE_SIZE, attention_dim=attention_dim, embed_dim=embed_dim,
                       decoder_dim=decoder_dim, dropout=dropout)


def _encoded_size(encoder: Any) -> int:
    """The tutorial Encoder's enc_image_size (its adaptive pooling size); 14 where only a state dict was saved."""
    size = getattr(encoder, "__dict__", {}).get("enc_image_size")
    pool = getattr(encoder, "__dict__", {}).get("_modules", {}).get("adaptive_pool")
    if size is None and pool is not None:
        size = pool.__dict__.get("output_size")
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) if size else 14


def _dropout(decoder: Any) -> float:
    module = getattr(decoder, "__dict__", {}).get("_modules", {}).get("dropout")
    return float(module.__dict__.get("p", 0.5)) if module is not None else 0.5


# ------------------------------------------------------------------------------------------------ vocabulary
def vocabulary_from_word_map(word_map: Any, vocab_size: int, source: Path) -> tuple[Vocabulary, Tensor]:
    """Our Vocabulary for the word map, and ``perm`` (V,): our id i is the tutorial's id perm[i]."""
    if not isinstance(word_map, dict) or not all(isinstance(i, int) for i in word_map.values()):
        raise TutorialImportError(f"{source}: expected a JSON object mapping words to integer ids")
    missing = [s for s in SPECIALS if s not in word_map]
    if missing:
        raise TutorialImportError(f"{source}: the word map lacks {missing} (a tutorial WORDMAP_*.json has "
                                  f"{list(SPECIALS)})")
    if sorted(word_map.values()) != list(range(vocab_size)):
        raise TutorialImportError(f"{source}: the word map's ids are not 0..{vocab_size - 1}, the rows of the "
                                  f"checkpoint's embedding ({len(word_map)} entries): a word map of another run?")
    words = sorted((w for w in word_map if w not in SPECIALS), key=word_map.__getitem__)
    try:
        vocab = Vocabulary(words)
    except ValueError as e:
        raise TutorialImportError(f"{source}: {e}") from None
    return vocab, torch.tensor([word_map[w] for w in vocab.itos])


def permute_vocabulary_rows(decoder: dict[str, Tensor], perm: Tensor) -> dict[str, Tensor]:
    """Rows of the word embedding and the output layer in our vocabulary's order."""
    out = dict(decoder)
    for key in ("embedding.weight", "fc.weight", "fc.bias"):
        out[key] = decoder[key][perm].contiguous()
    return out


# ------------------------------------------------------------------------------------------------------ main
def convert(checkpoint: str | Path, word_map: str | Path) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """The tutorial's checkpoint and word map -> our model (eval mode), vocabulary, and what was imported."""
    checkpoint, word_map = Path(checkpoint), Path(word_map)
    ckpt = read_tutorial_checkpoint(checkpoint)
    if not word_map.is_file():
        raise TutorialImportError(f"word map not found: {word_map}")
    encoder, enc_obj = _state_dict(ckpt, "encoder", "models.Encoder", checkpoint)
    decoder, dec_obj = _state_dict(ckpt, "decoder", "models.DecoderWithAttention", checkpoint)
    cfg = infer_config(encoder, decoder, _encoded_size(enc_obj), _dropout(dec_obj), checkpoint)
    vocab, perm = vocabulary_from_word_map(read_json(word_map, TutorialImportError), cfg.vocab_size, word_map)
    decoder = permute_vocabulary_rows(decoder, perm)
    model = CaptionModel(cfg)
    weights = {f"encoder.{k}": v for k, v in encoder.items()} | {f"decoder.{k}": v for k, v in decoder.items()}
    for key, value in model.state_dict().items():  # torch < 0.4.1 had no BatchNorm step counter
        if key.endswith(".num_batches_tracked"):
            weights.setdefault(key, torch.zeros_like(value))
    try:
        load_model_weights(model, weights, checkpoint)
    except CheckpointError as e:
        raise TutorialImportError(str(e)) from None
    info = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(checkpoint),
            "word_map": str(word_map.resolve()), "epoch": ckpt.get("epoch"), "bleu4": ckpt.get("bleu-4")}
    return model.eval(), vocab, info


def import_tutorial(checkpoint: str | Path, word_map: str | Path,
                    out: str | Path) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """Convert, and write one of our checkpoints (atomically) at ``out``; returns what ``convert`` does."""
    model, vocab, info = convert(checkpoint, word_map)
    save_checkpoint(out, make_checkpoint(model, vocab, decode={"max_len": TUTORIAL_MAX_LEN}, imported_from=info))
    return model, vocab, info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.import_tutorial", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", type=Path, help="the tutorial's BEST_checkpoint_*.pth.tar (or checkpoint_*)")
    p.add_argument("word_map", type=Path, help="the tutorial's WORDMAP_*.json")
    p.add_argument("--out", type=Path, required=True, help="our checkpoint to write (.pt)")
    args = p.parse_args(argv)
    try:
        model, vocab, info = import_tutorial(args.checkpoint, args.word_map, args.out)
    except TutorialImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    cfg = model.cfg
    print(f"imported {args.checkpoint} (epoch {info['epoch']}, BLEU-4 {info['bleu4']}) -> {args.out}: {cfg.backbone}, "
          f"{cfg.encoded_size}x{cfg.encoded_size} regions, vocabulary {len(vocab)}, image size {cfg.image_size}, "
          f"max_len {TUTORIAL_MAX_LEN}")
    print(f"caption like the tutorial: python -m export.caption IMAGES --model {args.out} --backend eager "
          f"--search tutorial")
    print(f"export: python export/to_onnx.py --checkpoint {args.out} --out DIR   # records max_len {TUTORIAL_MAX_LEN}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
