"""Tutorial checkpoints built field by field, to be made hostile: every object pickles under one of the class names
a tutorial checkpoint holds (``models.Encoder``, ``torch.nn.modules.conv.Conv2d``, ...), with exactly the
attributes given, so a test can put anything in any field (a cycle, a list where a dict belongs, a grid of 'abc').

    state = tutorial_state()                       # a valid, small checkpoint: ResNet-18 encoder, tiny decoder
    state["decoder"].attrs["_modules"]["dropout"].attrs["p"] = 7
    save(state, path); WORD_MAP                    # and the word map that goes with it

The encoder's weights are zero-stride views of one number (a real ResNet-18's shapes in a file of a few kB);
the decoder's are small real tensors.
"""

from __future__ import annotations

import copyreg
import sys
import threading
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

WORDS = ["a", "dog", "runs", "red", "ball"]
WORD_MAP = {**{w: i + 1 for i, w in enumerate(WORDS)}, "<unk>": 6, "<start>": 7, "<end>": 8, "<pad>": 0}
DIMS = dict(attention_dim=16, embed_dim=8, decoder_dim=16, encoder_dim=512)  # ResNet-18 gives 512 channels
GRID = 2

# The tutorial's own module, as its pickles name it: classes to be named, never run.
MODELS = types.ModuleType("models")
for _name in ("Encoder", "DecoderWithAttention", "Attention"):
    setattr(MODELS, _name, type(_name, (), {"__module__": "models"}))


class Pickles:
    """Pickles as a new ``cls`` (a real class, or one of MODELS) whose attributes are ``attrs``, nothing run."""

    def __init__(self, cls: type, attrs: dict[str, Any]) -> None:
        self.cls, self.attrs = cls, attrs

    @property
    def __class__(self):  # what pickle's NEWOBJ check reads: the class this object poses as
        return self.cls

    def __reduce_ex__(self, protocol: int):
        return copyreg.__newobj__, (self.cls,), self.attrs


def module(cls: type, params=None, buffers=None, modules=None, **attrs: Any) -> Pickles:
    return Pickles(cls, {"training": False, "_parameters": dict(params or {}), "_buffers": dict(buffers or {}),
                         "_non_persistent_buffers_set": set(), "_modules": dict(modules or {}), **attrs})


def _zero_stride(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape and dtype whose storage holds one element."""
    if t.dim() == 0:
        return t.clone()  # BatchNorm's step counter
    return torch.full((1,), 0.01, dtype=t.dtype).expand(t.shape)


def from_torch(m: nn.Module, cheap: bool) -> Pickles:
    """A real module's tree as Pickles (its class names, its tensors: zero-stride copies when ``cheap``)."""
    wrap = _zero_stride if cheap else (lambda t: t.detach().clone())
    extra = {k: getattr(m, k) for k in ("p", "output_size") if k in vars(m)}
    return module(type(m), {k: nn.Parameter(wrap(v), requires_grad=False) if v is not None else None
                            for k, v in m._parameters.items()},
                  {k: wrap(v) if v is not None else None for k, v in m._buffers.items()},
                  {k: from_torch(c, cheap) for k, c in m._modules.items()}, **extra)


_RESNET18: list[nn.Module] = []


def tutorial_state() -> dict[str, Any]:
    """A fresh valid checkpoint in the tutorial's layout (every call builds new objects: mutate freely)."""
    if not _RESNET18:
        _RESNET18.append(nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]))
    torch.manual_seed(0)
    d, v = DIMS, len(WORD_MAP)
    attention = module(MODELS.Attention, modules={
        "encoder_att": from_torch(nn.Linear(d["encoder_dim"], d["attention_dim"]), False),
        "decoder_att": from_torch(nn.Linear(d["decoder_dim"], d["attention_dim"]), False),
        "full_att": from_torch(nn.Linear(d["attention_dim"], 1), False),
        "relu": from_torch(nn.ReLU(), False), "softmax": from_torch(nn.Softmax(dim=1), False)})
    decoder = module(MODELS.DecoderWithAttention, modules={
        "attention": attention,
        "embedding": from_torch(nn.Embedding(v, d["embed_dim"]), False),
        "dropout": from_torch(nn.Dropout(p=0.3), False),
        "decode_step": from_torch(nn.LSTMCell(d["embed_dim"] + d["encoder_dim"], d["decoder_dim"]), False),
        "init_h": from_torch(nn.Linear(d["encoder_dim"], d["decoder_dim"]), False),
        "init_c": from_torch(nn.Linear(d["encoder_dim"], d["decoder_dim"]), False),
        "f_beta": from_torch(nn.Linear(d["decoder_dim"], d["encoder_dim"]), False),
        "sigmoid": from_torch(nn.Sigmoid(), False),
        "fc": from_torch(nn.Linear(d["decoder_dim"], v), False)}, vocab_size=v)
    encoder = module(MODELS.Encoder, modules={"resnet": from_torch(_RESNET18[0], True),
                                              "adaptive_pool": from_torch(nn.AdaptiveAvgPool2d((GRID, GRID)), True)},
                     enc_image_size=GRID)
    return {"epoch": 3, "epochs_since_improvement": 0, "bleu-4": 0.2, "encoder": encoder, "decoder": decoder,
            "encoder_optimizer": None, "decoder_optimizer": None}


@contextmanager
def _models_module():
    saved = sys.modules.get("models")
    sys.modules["models"] = MODELS
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["models"]
        else:
            sys.modules["models"] = saved


def save(state: Any, path: Path) -> Path:
    """torch.save ``state`` in a thread with a large stack, so that structures nested 100,000 deep can be written
    (pickle recurses once per level)."""
    failure: list[BaseException] = []

    def write() -> None:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(1_000_000)
        try:
            with _models_module():
                torch.save(state, path)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(e)
        finally:
            sys.setrecursionlimit(limit)

    size = threading.stack_size(1 << 30)
    try:
        t = threading.Thread(target=write)
        t.start()
    finally:
        threading.stack_size(size)
    t.join()
    if failure:
        raise failure[0]
    return path
