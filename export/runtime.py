"""Run an exported captioning model: ONNX Runtime, TorchScript or eager PyTorch behind one interface.

    from export.runtime import load_backend, Captioner
    backend = load_backend("ort", "exported/")              # or "torchscript", or "eager" with a .pt checkpoint
    backend = load_backend("ort", "exported/", precision="auto")   # int8 where the export validated it (see below)
    captioner = Captioner(backend, beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

The public API in one import: the backends are in export/backends.py, the Captioner in export/captioner.py;
:func:`load_backend` picks a backend by name and path, and a precision: ``fp32`` (default), ``int8`` (int8 encoder
+ int8 step, ``export --quantize int8``), ``bf16`` (eager encoder under bf16 autocast + the fp32 step) or ``auto``:
the fastest path the export validated and this machine runs natively (``core.hardware.choose_precision``, logged).
An export directory is self-contained (see export/manifest.py): running it needs core.decode, core.vocab and
core.images, never the training code or the checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from core import hardware
from core.decode import Encoded
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
from export.manifest import (
    DEFAULT_MAX_LEN,
    ENCODER_INT8_ONNX,
    MANIFEST,
    SAFETENSORS,
    ExportFormatError,
    check_pinned,
    default_preprocess,
    read_manifest,
    transform_for,
)

BACKENDS = ("ort", "torchscript", "eager")
PRECISIONS = hardware.PRECISIONS
log = logging.getLogger("sat.export.runtime")


class Bf16EncoderBackend(Backend):
    """--precision bf16: the eager encoder under bf16 autocast (outputs back to fp32), another backend's fp32 step."""

    name = "bf16"

    def __init__(self, eager: EagerBackend, stepper: Backend):
        self.eager, self.stepper = eager, stepper
        self.device, self.vocab, self.manifest = stepper.device, stepper.vocab, stepper.manifest
        self.preprocess = stepper.preprocess

    @property
    def decode_defaults(self):
        return self.stepper.decode_defaults

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> Encoded:
        images = self.check_images(images).to(self.eager.device)
        with torch.autocast(self.eager.device.type, dtype=torch.bfloat16):
            out = self.eager.model.encode(images)
        return Encoded(*(t.float().contiguous() for t in out))  # contiguous: the ORT step would copy each step

    def step(self, words, h, c, enc_out, enc_att):
        return self.stepper.step(words, h, c, enc_out, enc_att)

    def describe(self) -> str:
        return f"eager bf16 encoder + {self.stepper.describe()}"


def int8_record(manifest: dict | None) -> dict | None:
    """What the export says of its int8 encoder + step path (None: it has none)."""
    q = ((manifest or {}).get("quantization") or {}).get("int8_path")
    if not q or ENCODER_INT8_ONNX not in (manifest or {}).get("files", {}):
        return None
    return {"validated": bool(q.get("validated")), "weight_format": q.get("weight_format"), "why": q.get("why", "")}


def resolve_precision(requested: str, path: Path, backend: str, device: str | None) -> hardware.Choice:
    """--precision of a backend and export, through core.hardware.choose_precision; logged with its reason."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if backend != "ort":
        if requested == "int8":
            raise ValueError(f"int8/fp16 graphs are ONNX only; the {backend} backend runs fp32 (or --precision bf16)")
        return hardware.Choice("fp32" if requested == "auto" else requested, f"{backend} backend")
    hw = hardware.detect(ort=device != "cpu")
    on = "cuda" if device == "cuda" or (device is None and hw.ort_cuda) else "cpu"
    manifest = read_manifest(path) if requested in ("auto", "int8") else None
    choice = hardware.choose_precision(requested, hw, int8_record(manifest), on)
    log.debug("precision %s: %s", choice.value, choice.reason)  # the caller logs it with the rest of its set-up
    if choice.warning:
        log.warning("precision %s: %s", choice.value, choice.warning)
    return choice


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
                 int8: bool = False, fp16: bool = False, device: str | None = None, verify: bool = True,
                 precision: str = "fp32", expect_sha256: str | None = None) -> Backend:
    """``name`` in ort|torchscript|eager. ``path``: an export directory; for eager also a checkpoint .pt.

    eager + directory: the export's model.safetensors (written by export/to_onnx.py unless --no-safetensors),
    or a directory holding only model.safetensors + model.json (core.checkpoint.save_safetensors).
    ``precision``: fp32 | int8 | bf16 | auto (module docstring); ``int8=True`` alone is the int8 step with the fp32
    encoder. The backend's ``precision`` attribute holds the choice (a core.hardware.Choice).
    ``expect_sha256``: refuse unless manifest.json (or the checkpoint file) has this sha256 (export/manifest.py).
    """
    path = Path(path)
    if expect_sha256:
        check_pinned(path, expect_sha256)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name}; expected one of {', '.join(BACKENDS)}")
    if name != "eager" and path.is_file():
        raise ExportFormatError(f"{path} is a file, not an export directory: the {name} backend runs an export. "
                                f"Use --backend eager to run a checkpoint as it is, or export it first: "
                                f"python export/to_onnx.py --checkpoint {path} --out DIR")
    if int8 or fp16 or precision == "fp32":
        backend = _load(name, path, providers, threads, int8, fp16, device, verify)
        backend.precision = hardware.Choice("int8 step" if int8 else "fp16" if fp16 else "fp32", "requested")
        return backend
    choice = resolve_precision(precision, path, name, device)
    if choice.value == "int8":  # int8 encoder + int8 step
        backend = _load(name, path, providers, threads, True, False, device, verify, int8_encoder=True)
    else:
        backend = _load(name, path, providers, threads, False, False, device, verify)
    if choice.value == "bf16":
        eager = backend if name == "eager" else _load_eager(path, str(backend.device), verify)
        backend = Bf16EncoderBackend(eager, backend)
    backend.precision = choice
    return backend


def _load(name: str, path: Path, providers, threads: int | None, int8: bool, fp16: bool, device: str | None,
          verify: bool, int8_encoder: bool = False) -> Backend:
    if name == "ort":
        if device and providers is None:
            providers = [device]
        return OrtBackend(path, providers=providers, threads=threads, int8=int8, fp16=fp16, verify=verify,
                          int8_encoder=int8_encoder)
    if int8 or fp16:
        raise ValueError(f"int8/fp16 graphs are ONNX only; the {name} backend runs fp32")
    if name == "torchscript":
        return TorchScriptBackend(path, device=device, verify=verify, threads=threads)
    if threads:
        torch.set_num_threads(int(threads))
    return _load_eager(path, device, verify)


def model_load_errors() -> tuple[type[Exception], ...]:
    """What loading a model it cannot use raises (the caption and serve commands print one error line, exit 2)."""
    from core.checkpoint import CheckpointError  # here, not at import: it imports the model (torchvision)

    return ExportFormatError, CheckpointError, RuntimeError, ValueError, OSError

__all__ = [
    "model_load_errors",
    "BACKENDS",
    "DEFAULT_MAX_LEN",
    "Backend",
    "OrtBackend",
    "TorchScriptBackend",
    "EagerBackend",
    "load_backend",
    "resolve_precision",
    "Bf16EncoderBackend",
    "Captioner",
    "CaptionResult",
    "default_preprocess",
    "transform_for",
    "check_images",
    "resolve_providers",
    "ExportFormatError",
    "VocabFormatError",
]
