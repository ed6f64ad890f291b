"""Running an export: the backends, the Captioner, loading a model by name and precision, the caption command.

    from export.runtime import load_backend, Captioner
    captioner = Captioner(load_backend("ort", "exported/", precision="auto"), beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

This package's public API is the names below; the server (export.serve) and the benchmarks use only these.
An export directory is self-contained (export/manifest.py): running it needs core.decode, core.vocab and
core.images, never the training code or the checkpoint.
"""

from core.vocab import VocabFormatError
from export.manifest import DEFAULT_MAX_LEN, ExportFormatError, default_preprocess, transform_for
from export.runtime.backends import (
    Backend,
    Bf16EncoderBackend,
    EagerBackend,
    OrtBackend,
    TorchScriptBackend,
    check_images,
    resolve_providers,
    torch_threads,
)
from export.runtime.captioner import Captioner, CaptionResult, decode_controls
from export.runtime.load import (
    BACKENDS,
    PRECISIONS,
    add_model_args,
    check_decode_args,
    inference_threads,
    load_backend,
    load_captioner,
    model_load_errors,
    resolve_precision,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_MAX_LEN",
    "PRECISIONS",
    "Backend",
    "Bf16EncoderBackend",
    "CaptionResult",
    "Captioner",
    "EagerBackend",
    "ExportFormatError",
    "OrtBackend",
    "TorchScriptBackend",
    "VocabFormatError",
    "add_model_args",
    "check_decode_args",
    "check_images",
    "decode_controls",
    "default_preprocess",
    "inference_threads",
    "load_backend",
    "load_captioner",
    "model_load_errors",
    "resolve_precision",
    "resolve_providers",
    "torch_threads",
    "transform_for",
]
