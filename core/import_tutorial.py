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

Nothing in the files is trusted: every field's type, range and size is checked before it is used (module trees
walked without recursion, to a bounded depth, cycles refused; dimensions bounded and every tensor's shape compared
with the model's, built on the meta device, before anything is allocated; weights must be finite). Any fault is
one line, exit 2.
"""

from __future__ import annotations

import argparse
import math
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
from core.fileio import UnsafeTorchError, WriteError, abbreviate, load_weights_only, read_json, sha256_file
from core.model import BACKBONE_CHANNELS, CaptionModel, ModelConfig
from core.vocab import SPECIALS, Vocabulary

TUTORIAL_IMAGE_SIZE = 256
TUTORIAL_MAX_LEN = 51  # caption.py: `if step > 50: break` after its step, so up to 51 steps

# Bounds, each far above a real tutorial file (ResNet-101, 14x14, dims 512, vocabulary ~9.5k for COCO, ~0.5 GB):
MAX_CHECKPOINT_BYTES = 4 << 30
MAX_WORD_MAP_BYTES = 64 << 20
MAX_MODULE_DEPTH = 16  # the tutorial's deepest tensor: encoder.resnet.7.2.downsample.0.weight (depth 5)
MAX_TENSORS = 10_000  # ResNet-152 + decoder: ~1,000
MAX_DIM = 16_384  # embed, attention and decoder dims
MAX_VOCAB = 1_000_000
MAX_GRID = 64  # enc_image_size
MAX_PARAMETERS = 1_000_000_000  # of the model the file describes, counted on the meta device before allocation
MAX_WORD_CHARS = 200
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")  # a module, parameter or buffer name
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int64, torch.int32)

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
    _check_size(path, MAX_CHECKPOINT_BYTES)
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
        what = sorted(abbreviate(k, 30) for k in list(ckpt)[:8]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TutorialImportError(f"{path} is not a tutorial checkpoint: expected a dict with 'encoder' and "
                                  f"'decoder', got {what}")
    return ckpt


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise TutorialImportError(f"{path}: {size} bytes, over the bound of {limit} for this file (a tutorial's is "
                                  "far smaller)")


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
def _table(obj: Any, attr: str, kind: type | tuple[type, ...], where: str, source: Path) -> dict[str, Any]:
    """``obj.<attr>`` of a pickled module: a dict of valid names to ``kind`` or None ({} when absent)."""
    table = vars(obj).get(attr, {})
    if not isinstance(table, dict):
        raise TutorialImportError(f"{source}: {where}{attr} is {abbreviate(table)}, expected a dict")
    for name, value in table.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TutorialImportError(f"{source}: {where}{attr} has an entry named {abbreviate(name)}")
        if value is not None and not isinstance(value, kind):
            raise TutorialImportError(f"{source}: {where}{name} is {abbreviate(value)}, not a "
                                      f"{'module' if kind is Pickled else 'tensor'}")
    return table


def module_state(root: Any, source: Path = Path("checkpoint"), key: str = "") -> dict[str, Tensor]:
    """The state_dict of a pickled module: parameters, persistent buffers and submodules, walked without recursion
    to MAX_MODULE_DEPTH levels; a module met twice (a cycle) and more than MAX_TENSORS tensors are refused."""
    state: dict[str, Tensor] = {}
    seen: set[int] = set()
    stack = [(root, "")]
    while stack:
        obj, prefix = stack.pop()
        where = f"'{key}'.{prefix}" if key else prefix
        if id(obj) in seen:
            raise TutorialImportError(f"{source}: {where.rstrip('.')} appears twice in the module tree (a cycle?)")
        seen.add(id(obj))
        if prefix.count(".") > MAX_MODULE_DEPTH:
            raise TutorialImportError(f"{source}: modules nested over {MAX_MODULE_DEPTH} deep ({where[:80]}...)")
        skip = vars(obj).get("_non_persistent_buffers_set", set())
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        for name, p in _table(obj, "_parameters", Tensor, where, source).items():
            if p is not None:
                state[prefix + name] = p.detach()
        for name, b in _table(obj, "_buffers", Tensor, where, source).items():
            if b is not None and name not in skip:
                state[prefix + name] = b
        if len(state) > MAX_TENSORS:
            raise TutorialImportError(f"{source}: '{key}' holds over {MAX_TENSORS} tensors")
        children = _table(obj, "_modules", Pickled, where, source)
        stack.extend((child, f"{prefix}{name}.") for name, child in reversed(children.items()) if child is not None)
    return state


def _state_dict(ckpt: dict, key: str, expected: str, path: Path) -> tuple[dict[str, Tensor], Any]:
    """ckpt[key] as a state dict, and the pickled module (None where the file holds a state dict)."""
    obj = ckpt[key]
    if isinstance(obj, STAND_INS["torch.nn.parallel.data_parallel.DataParallel"]):
        obj = _table(obj, "_modules", Pickled, f"'{key}'.", path).get("module")
        if obj is None:
            raise TutorialImportError(f"{path}: '{key}' is a DataParallel without its 'module'")
    if isinstance(obj, Pickled):
        if obj.pickled_as != expected:
            raise TutorialImportError(f"{path}: '{key}' is a {obj.pickled_as}, expected the tutorial's {expected}")
        return module_state(obj, path, key), obj
    if isinstance(obj, Mapping) and len(obj) <= MAX_TENSORS and all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return {k.removeprefix("module."): v for k, v in obj.items()}, None
    raise TutorialImportError(f"{path}: '{key}' is neither a pickled {expected} nor a state dict")


def infer_backbone(encoder: Mapping[str, Tensor], source: Path) -> str:
    """ResNet depth from the blocks of stages resnet.4 .. resnet.7 (layer1 .. layer4)."""
    blocks = []
    for stage in range(4, 8):
        ids = {k.split(".")[2] for k in encoder if k.startswith(f"resnet.{stage}.")}
        if not all(i.isdigit() and len(i) < 4 for i in ids):
            raise TutorialImportError(f"{source}: the encoder's stage resnet.{stage} has a block named "
                                      f"{abbreviate(next(i for i in ids if not i.isdigit() or len(i) >= 4))}")
        blocks.append(max(map(int, ids)) + 1 if ids else 0)
    kind = "bottleneck" if any(".conv3." in k for k in encoder) else "basic"
    backbone = RESNETS.get((kind, tuple(blocks)))
    if backbone is None:
        raise TutorialImportError(f"{source}: the encoder is not a torchvision ResNet we know ({kind} blocks "
                                  f"{blocks} per stage; known: {sorted(RESNETS.values())})")
    return backbone


def _shape(decoder: Mapping[str, Tensor], key: str, ndim: int, source: Path) -> tuple[int, ...]:
    """The shape of decoder tensor ``key``, which must have ``ndim`` dimensions each within 1..MAX_DIM/MAX_VOCAB."""
    if key not in decoder:
        raise TutorialImportError(f"{source}: the decoder has no '{key}': not the tutorial's DecoderWithAttention")
    shape = tuple(decoder[key].shape)
    if len(shape) != ndim:
        raise TutorialImportError(f"{source}: decoder '{key}' has shape {shape}, expected {ndim} dimensions")
    limit = MAX_VOCAB if key in ("embedding.weight", "fc.weight") else MAX_DIM
    if not all(1 <= d <= limit for d in shape[:1]) or not all(1 <= d <= MAX_DIM for d in shape[1:]):
        raise TutorialImportError(f"{source}: decoder '{key}' has shape {shape}: dimensions must be 1..{MAX_DIM} "
                                  f"(vocabulary rows 1..{MAX_VOCAB})")
    return shape


def infer_config(encoder: Mapping[str, Tensor], decoder: Mapping[str, Tensor], encoded_size: int, dropout: float,
                 source: Path) -> ModelConfig:
    vocab_size, embed_dim = _shape(decoder, "embedding.weight", 2, source)
    attention_dim, encoder_dim = _shape(decoder, "attention.encoder_att.weight", 2, source)
    decoder_dim = _shape(decoder, "init_h.weight", 2, source)[0]
    if vocab_size <= len(SPECIALS):
        raise TutorialImportError(f"{source}: the embedding has {vocab_size} rows: a vocabulary needs the "
                                  f"{len(SPECIALS)} special tokens and at least one word")
    backbone = infer_backbone(encoder, source)
    if BACKBONE_CHANNELS[backbone] != encoder_dim:
        raise TutorialImportError(f"{source}: the decoder attends over {encoder_dim} channels but a {backbone} "
                                  f"encoder gives {BACKBONE_CHANNELS[backbone]}")
    return ModelConfig(vocab_size=vocab_size, backbone=backbone, encoded_size=encoded_size,
                       image_size=TUTORIAL_IMAGE_SIZE, attention_dim=attention_dim, embed_dim=embed_dim,
                       decoder_dim=decoder_dim, dropout=dropout)


def _attrs(obj: Any) -> dict[str, Any]:
    return vars(obj) if isinstance(obj, Pickled) else {}


def _encoded_size(encoder: Any, source: Path) -> int:
    """The tutorial Encoder's enc_image_size (its adaptive pooling size); 14 where only a state dict was saved."""
    size = _attrs(encoder).get("enc_image_size")
    modules = _attrs(encoder).get("_modules", {})
    pool = modules.get("adaptive_pool") if isinstance(modules, dict) else None
    if size is None and pool is not None:
        if not isinstance(pool, STAND_INS["torch.nn.modules.pooling.AdaptiveAvgPool2d"]):
            raise TutorialImportError(f"{source}: the encoder's adaptive_pool is {abbreviate(pool)}, not an "
                                      "AdaptiveAvgPool2d")
        size = _attrs(pool).get("output_size")
    if size is None:
        return 14
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_GRID:
        raise TutorialImportError(f"{source}: the encoder's grid size (enc_image_size) is {abbreviate(size)}, "
                                  f"expected a whole number 1..{MAX_GRID}")
    return size


def _dropout(decoder: Any, source: Path) -> float:
    modules = _attrs(decoder).get("_modules", {})
    module = modules.get("dropout") if isinstance(modules, dict) else None
    if module is None:
        return 0.5
    p = _attrs(module).get("p", 0.5) if isinstance(module, STAND_INS["torch.nn.modules.dropout.Dropout"]) else module
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise TutorialImportError(f"{source}: the decoder's dropout is {abbreviate(p)}, expected a probability "
                                  "0 <= p < 1")
    return float(p)


def check_tensors(weights: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: Path) -> None:
    """Every tensor of ``weights`` is one of ``expected`` (the model's, on the meta device) with its shape, a float
    dtype (integer step counters aside), dense, and finite: checked before anything is copied or allocated."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = (f"lacks {missing[:3]}" if missing
                else f"has tensors the model lacks: {[abbreviate(k) for k in unexpected[:3]]}")
        raise TutorialImportError(f"{source}: not the tutorial's model: it {what}")
    for key, t in weights.items():
        if t.shape != expected[key].shape:
            raise TutorialImportError(f"{source}: '{key}' has shape {tuple(t.shape)}, the model's is "
                                      f"{tuple(expected[key].shape)}")
        counter = key.endswith(".num_batches_tracked")  # BatchNorm's step counter: an integer
        if t.layout != torch.strided or t.dtype not in (_INT_DTYPES if counter else _FLOAT_DTYPES):
            raise TutorialImportError(f"{source}: '{key}' is a {t.dtype} {t.layout} tensor, expected dense floats")
        if not counter and not bool(torch.isfinite(t).all()):
            raise TutorialImportError(f"{source}: '{key}' holds NaN or infinite values: a diverged training run?")


# ------------------------------------------------------------------------------------------------ vocabulary
def vocabulary_from_word_map(word_map: Any, vocab_size: int, source: Path) -> tuple[Vocabulary, Tensor]:
    """Our Vocabulary for the word map, and ``perm`` (V,): our id i is the tutorial's id perm[i]."""
    if not isinstance(word_map, dict) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                 for i in word_map.values()):
        raise TutorialImportError(f"{source}: expected a JSON object mapping words to integer ids")
    missing = [s for s in SPECIALS if s not in word_map]
    if missing:
        raise TutorialImportError(f"{source}: the word map lacks {missing} (a tutorial WORDMAP_*.json has "
                                  f"{list(SPECIALS)})")
    if len(word_map) != vocab_size or set(word_map.values()) != set(range(vocab_size)):
        raise TutorialImportError(f"{source}: the word map's ids are not 0..{vocab_size - 1}, the rows of the "
                                  f"checkpoint's embedding ({len(word_map)} entries): a word map of another run?")
    long = next((w for w in word_map if len(w) > MAX_WORD_CHARS), None)
    if long is not None:
        raise TutorialImportError(f"{source}: the word {abbreviate(long)} is over {MAX_WORD_CHARS} characters")
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
def _run_info(ckpt: dict, source: Path) -> dict[str, Any]:
    """The checkpoint's epoch and BLEU-4 (recorded and printed): a whole number and a finite number, or absent."""
    epoch, bleu4 = ckpt.get("epoch"), ckpt.get("bleu-4")
    if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 10**9):
        raise TutorialImportError(f"{source}: 'epoch' is {abbreviate(epoch)}, expected a whole number")
    if bleu4 is not None and (not isinstance(bleu4, (int, float)) or isinstance(bleu4, bool)
                              or not math.isfinite(bleu4)):
        raise TutorialImportError(f"{source}: 'bleu-4' is {abbreviate(bleu4)}, expected a number")
    return {"epoch": epoch, "bleu4": bleu4}


def _read_word_map(path: Path) -> Any:
    if not path.is_file():
        raise TutorialImportError(f"word map not found: {path}")
    _check_size(path, MAX_WORD_MAP_BYTES)
    return read_json(path, TutorialImportError)


def _expected_weights(cfg: ModelConfig, source: Path) -> dict[str, Tensor]:
    """The model's tensors as the config describes it, on the meta device (no memory), size-checked."""
    with torch.device("meta"):
        expected = CaptionModel(cfg).state_dict()
    count = sum(t.numel() for t in expected.values())
    if count > MAX_PARAMETERS:
        raise TutorialImportError(f"{source}: the model it describes has {count} parameters, over the bound of "
                                  f"{MAX_PARAMETERS}")
    return expected


def convert(checkpoint: str | Path, word_map: str | Path) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """The tutorial's checkpoint and word map -> our model (eval mode), vocabulary, and what was imported."""
    checkpoint, word_map = Path(checkpoint), Path(word_map)
    ckpt = read_tutorial_checkpoint(checkpoint)
    words = _read_word_map(word_map)
    run = _run_info(ckpt, checkpoint)
    encoder, enc_obj = _state_dict(ckpt, "encoder", "models.Encoder", checkpoint)
    decoder, dec_obj = _state_dict(ckpt, "decoder", "models.DecoderWithAttention", checkpoint)
    cfg = infer_config(encoder, decoder, _encoded_size(enc_obj, checkpoint), _dropout(dec_obj, checkpoint), checkpoint)
    expected = _expected_weights(cfg, checkpoint)
    weights = {f"encoder.{k}": v for k, v in encoder.items()} | {f"decoder.{k}": v for k, v in decoder.items()}
    for key, value in expected.items():  # torch < 0.4.1 had no BatchNorm step counter
        if key.endswith(".num_batches_tracked"):
            weights.setdefault(key, torch.zeros(value.shape, dtype=value.dtype))
    check_tensors(weights, expected, checkpoint)
    vocab, perm = vocabulary_from_word_map(words, cfg.vocab_size, word_map)
    weights |= {f"decoder.{k}": v for k, v in permute_vocabulary_rows(decoder, perm).items()}
    model = CaptionModel(cfg)
    try:
        load_model_weights(model, weights, checkpoint)
    except CheckpointError as e:
        raise TutorialImportError(str(e)) from None
    info = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": sha256_file(checkpoint),
            "word_map": str(word_map.resolve()), **run}
    return model.eval(), vocab, info


def import_tutorial(checkpoint: str | Path, word_map: str | Path,
                    out: str | Path) -> tuple[CaptionModel, Vocabulary, dict[str, Any]]:
    """Convert, and write one of our checkpoints (atomically) at ``out``; returns what ``convert`` does.
    Every failure, reading or writing, is a TutorialImportError (one line)."""
    model, vocab, info = convert(checkpoint, word_map)
    try:
        save_checkpoint(out, make_checkpoint(model, vocab, decode={"max_len": TUTORIAL_MAX_LEN}, imported_from=info))
    except (WriteError, OSError) as e:
        raise TutorialImportError(str(e) if isinstance(e, WriteError) else f"cannot write {out}: {e.strerror or e}") \
            from None
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
        return 2
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
