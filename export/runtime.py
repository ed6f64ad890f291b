"""Run an exported captioning model: ONNX Runtime, TorchScript or eager PyTorch behind one interface.

    from export.runtime import load_backend, Captioner
    backend = load_backend("ort", "exported/")              # or "torchscript", or "eager" with a .pt checkpoint
    captioner = Captioner(backend, beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

The public API in one import: the backends are in export/backends.py, the Captioner in export/captioner.py;
:func:`load_backend` picks a backend by name and path.
An export directory is self-contained (see export/manifest.py): running it needs core.decode, core.vocab and
core.images, never the training code or the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from core.vocab import VocabFormatError
from export.backends import (
    Backend,
    EagerBackend,
    OrtBackend,
    TorchScriptBackend,
    check_images,
    resolve_providers,
)
from export.captioner import Captioner, CaptionResult
from export.manifest import DEFAULT_MAX_LEN, MANIFEST, SAFETENSORS, ExportFormatError, default_preprocess, transform_for

BACKENDS = ("ort", "torchscript", "eager")


def _load_eager(path: Path, device: str | None, verify: bool) -> EagerBackend:
    if path.is_file():
        return EagerBackend.from_checkpoint(path, device)
    if (path / MANIFEST).is_file():
        return EagerBackend.from_export_dir(path, device, verify)
    if (path / SAFETENSORS).is_file():
        from core.checkpoint import load_safetensors

        model, vocab = load_safetensors(path)
        return EagerBackend(model, vocab, device)
    raise ExportFormatError(f"{path}: expected a checkpoint .pt file or an export directory for the eager backend")


def load_backend(name: str, path: str | os.PathLike, *, providers=None, threads: int | None = None,
                 int8: bool = False, fp16: bool = False, device: str | None = None, verify: bool = True) -> Backend:
    """``name`` in ort|torchscript|eager. ``path``: an export directory; for eager also a checkpoint .pt.

    eager + directory: the export's model.safetensors (written by export/to_onnx.py unless --no-safetensors),
    or a directory holding only model.safetensors + model.json (core.checkpoint.save_safetensors).
    """
    path = Path(path)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name}; expected one of {', '.join(BACKENDS)}")
    if name != "eager" and path.is_file():
        raise ExportFormatError(f"{path} is a file, not an export directory: the {name} backend runs an export. "
                                f"Use --backend eager to run a checkpoint as it is, or export it first: "
                                f"python export/to_onnx.py --checkpoint {path} --out DIR")
    if name == "ort":
        if device and providers is None:
            providers = [device]
        return OrtBackend(path, providers=providers, threads=threads, int8=int8, fp16=fp16, verify=verify)
    if int8 or fp16:
        raise ValueError(f"int8/fp16 graphs are ONNX only; the {name} backend runs fp32")
    if name == "torchscript":
        return TorchScriptBackend(path, device=device, verify=verify, threads=threads)
    if threads:
        torch.set_num_threads(int(threads))
    return _load_eager(path, device, verify)


__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_LEN",
    "Backend",
    "OrtBackend",
    "TorchScriptBackend",
    "EagerBackend",
    "load_backend",
    "Captioner",
    "CaptionResult",
    "default_preprocess",
    "transform_for",
    "check_images",
    "resolve_providers",
    "ExportFormatError",
    "VocabFormatError",
]
