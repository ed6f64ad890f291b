"""The export directory's format: file names, graph input/output names, the manifest (built, read, verified).

    python export/to_onnx.py --checkpoint RUN/best.pt --out exported/     # writes a directory in this format

Shared by the exporter (export/to_onnx.py) and the runtime (export/runtime/load.py). No onnxruntime here, and
``onnx`` only inside :func:`check_external_data`.

An export directory holds::

    manifest.json          format, dims, preprocessing, special tokens, opset, exporter, sha256 of every file, parity
    vocab.json             core.vocab.Vocabulary.save format
    encoder.onnx           images [N,3,S,S] -> enc_out [N,P,C], enc_att [N,P,A], h [N,D], c [N,D]
    decoder_step.onnx      words [M], h [M,D], c [M,D], enc_out [N,P,C], enc_att [N,P,A] -> logprobs [M,V], h, c, alpha [M,P]
    decoder_step.int8.onnx (--quantize int8) dynamic int8 quantization of the step
    encoder.int8.onnx      (--quantize int8) static int8 (QDQ) quantization of the encoder, calibrated on images
    encoder.fp16.onnx, decoder_step.fp16.onnx  (--fp16, CUDA only) float32 interface, float16 inside
    encoder.ts, decoder_step.ts                (--torchscript) TorchScript traces of the same two graphs
    model.safetensors, model.json              weights + config for the eager backend (no pickle)

What the manifest's hashes do and do not protect. They are integrity, not authenticity: a file damaged or
changed after the export, alone, is refused; but anyone who can write the directory can also rewrite
``manifest.json`` with the new hashes, and the runtime cannot tell. TorchScript files (``*.ts``) are code: a
replaced ``encoder.ts`` runs whatever it holds when loaded, so load TorchScript only from a directory that only
you can write. To catch a rewritten manifest, pin it: the exporter logs the manifest's sha256, and
``python -m export.caption --expect-sha256 HEX`` (``load_backend(..., expect_sha256=HEX)``) refuses the export
unless ``manifest.json`` still has that hash, which, with the manifest's own hashes, pins every file. That
protects against the directory being changed after you recorded the hash (a shared or synced folder, a copy
from elsewhere); it does not say who made the export, and the check and the load are two reads, so someone
writing the directory during the load itself is not covered (copy it somewhere only you can write first).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.fileio import atomic_write_text, sha256_file  # sha256_file: also export.manifest API
from core.images import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

FORMAT = "sat-export"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
ENCODER_ONNX = "encoder.onnx"
STEP_ONNX = "decoder_step.onnx"
STEP_INT8_ONNX = "decoder_step.int8.onnx"
ENCODER_INT8_ONNX = "encoder.int8.onnx"
ENCODER_FP16_ONNX = "encoder.fp16.onnx"
STEP_FP16_ONNX = "decoder_step.fp16.onnx"
ENCODER_TS = "encoder.ts"
STEP_TS = "decoder_step.ts"
SAFETENSORS = "model.safetensors"
SAFETENSORS_META = "model.json"

DEFAULT_MAX_LEN = 20  # caption length limit where neither the manifest nor the checkpoint records one

ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("enc_out", "enc_att", "h", "c")
STEP_INPUTS = ("words", "h", "c", "enc_out", "enc_att")
STEP_OUTPUTS = ("logprobs", "h_next", "c_next", "alpha")


class ExportFormatError(RuntimeError):
    """An export directory or one of its files is missing, corrupt, changed since the export, or unsafe (names
    the file)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json``; every failure names the file."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise ExportFormatError(f"export directory not found: {export_dir}")
    if not path.is_file():
        raise ExportFormatError(
            f"no {MANIFEST} in {export_dir}: not an export directory (make one with "
            f"`python export/to_onnx.py --checkpoint RUN/best.pt --out {export_dir}`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{path} is not valid JSON (corrupt manifest): {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportFormatError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportFormatError(
            f"{path} has format version {manifest.get('format_version')!r}; this runtime reads version {FORMAT_VERSION}"
        )
    for key in ("files", "dims", "preprocess", "tokens"):
        if not isinstance(manifest.get(key), dict):
            raise ExportFormatError(f"{path}: missing or malformed section {key}")
    for name in manifest["files"]:
        if not safe_relative(name):
            raise ExportFormatError(f"{path}: file entry {name!r} points outside the export directory")
    return manifest


def safe_relative(name: str) -> bool:
    """True when ``name`` is a plain relative path that stays inside its directory (no absolute, no '..')."""
    if not name or "\\" in name or "\x00" in name:
        return False
    p = Path(name)
    return not p.is_absolute() and ".." not in p.parts and not name.startswith("~")


def check_pinned(path: str | os.PathLike, expected: str) -> str:
    """Refuse ``path`` (an export directory's manifest.json, or a checkpoint file) unless its sha256 is
    ``expected`` (64 hex digits, from a source you trust: see the module docstring). Returns the digest."""
    path = Path(path)
    target = path / MANIFEST if path.is_dir() else path
    expected = expected.strip().lower()
    if len(expected) != 64 or any(ch not in "0123456789abcdef" for ch in expected):
        raise ExportFormatError(f"expected sha256 {expected!r}: not 64 hexadecimal digits")
    if not target.is_file():
        raise ExportFormatError(f"{target}: not found, cannot check its sha256")
    digest = sha256_file(target)
    if digest != expected:
        raise ExportFormatError(f"{target}: sha256 {digest[:16]}... is not the expected {expected[:16]}...: the "
                                "export was changed since its hash was recorded (or another one was given); "
                                "refusing to load it")
    return digest


def read_verified(export_dir: str | os.PathLike, manifest: dict[str, Any], name: str, verify: bool = True) -> bytes:
    """Bytes of ``name`` after checking them against the manifest's sha256 (read once: no check/use race)."""
    path = Path(export_dir) / name
    entry = manifest["files"].get(name)
    if entry is None:
        raise ExportFormatError(f"{path} is not listed in {Path(export_dir) / MANIFEST}: refusing an unlisted file")
    if not path.is_file():
        raise ExportFormatError(f"model file missing: {path} (listed in the manifest; the export is incomplete)")
    data = path.read_bytes()
    if verify:
        digest = sha256_bytes(data)
        if digest != entry.get("sha256"):
            raise ExportFormatError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest ({str(entry.get('sha256'))[:16]}...): "
                "the file was modified or is corrupt; refusing to load it (re-export the model)"
            )
    return data


def check_external_data(model_bytes: bytes, export_dir: str | os.PathLike, name: str, manifest: dict | None = None,
                        verify: bool = True) -> list[str]:
    """Refuse ONNX external-data locations outside the export dir; return the external files used.

    Every tensor stored outside the .onnx file (initializers, and tensors inside Constant nodes or
    subgraphs) carries an ``external_data`` entry ``location``: it must be a relative path with no '..'
    that resolves inside ``export_dir``, and (with a manifest) be listed there with a matching hash.
    """
    import onnx

    export_dir = Path(export_dir).resolve()
    try:
        model = onnx.load_from_string(model_bytes)  # parses the proto only; external data is not read
    except Exception as e:  # DecodeError and friends
        raise ExportFormatError(f"{export_dir / name} is not a valid ONNX file (corrupt?): {e}") from e
    locations: list[str] = []
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        resolved = (export_dir / loc).resolve()
        if not safe_relative(loc) or not resolved.is_relative_to(export_dir):
            raise ExportFormatError(
                f"{export_dir / name}: tensor {tensor.name!r} stores its data at {loc!r}, outside the export "
                f"directory {export_dir}; refusing to load it"
            )
        if loc not in locations:
            locations.append(loc)
    for loc in locations:
        if manifest is not None:
            entry = manifest["files"].get(loc)
            if entry is None:
                raise ExportFormatError(f"{export_dir / name}: external data file {loc!r} is not listed in the manifest")
            if verify and sha256_file(export_dir / loc) != entry.get("sha256"):
                raise ExportFormatError(f"{export_dir / loc}: sha256 does not match the manifest (modified or corrupt)")
    return locations


def _all_tensors(graph):
    yield from graph.initializer
    yield from (t.values for t in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


# ------------------------------------------------------------------------------------------ preprocessing
def default_preprocess(image_size: int) -> dict[str, Any]:
    """The manifest's ``preprocess`` section: core.images' eval transform, written out as data."""
    return {
        "image_size": int(image_size),
        "resize": "stretch",  # whole image to (S, S), aspect ratio not kept, no crop
        "interpolation": "bilinear",  # Pillow Image.resize BILINEAR (antialiased when downscaling)
        "antialias": True,
        "color": "RGB",  # alpha composited onto white; grey/16-bit/CMYK converted (core.images.to_rgb)
        "exif_transpose": True,
        "divisor": 255.0,  # uint8 -> [0, 1] (x / 255) before normalization
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW",
        "dtype": "float32",
    }


def transform_for(spec: dict[str, Any]) -> ImageTransform:
    """The image transform a ``preprocess`` section describes: core.images' eval transform, the only one there is."""
    expected = default_preprocess(int(spec.get("image_size", 0)) or 1)
    for key in ("resize", "interpolation", "divisor", "mean", "std", "exif_transpose"):
        if key in spec and spec[key] != expected[key]:
            raise ExportFormatError(f"unsupported preprocessing: {key} = {spec[key]} (this runtime implements "
                                    f"{key} = {expected[key]}, the training transform)")
    return ImageTransform(int(spec["image_size"]), train=False)


# --------------------------------------------------------------------------------------------- building
def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of ``directory`` but the manifest."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(Path(directory).iterdir()) if p.is_file() and p.name != MANIFEST}


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


_IO = {
    "encoder": {"inputs": {"images": "float32[N,3,S,S]"},
                "outputs": {"enc_out": "float32[N,P,C]", "enc_att": "float32[N,P,A]",
                            "h": "float32[N,D]", "c": "float32[N,D]"}},
    "decoder_step": {"inputs": {"words": "int64[M]", "h": "float32[M,D]", "c": "float32[M,D]",
                                "enc_out": "float32[N,P,C]", "enc_att": "float32[N,P,A]"},
                     "outputs": {"logprobs": "float32[M,V]", "h_next": "float32[M,D]",
                                 "c_next": "float32[M,D]", "alpha": "float32[M,P]"},
                     "rows": "M = N*k, image-major: rows i*k..i*k+k-1 belong to image i"},
}


def build_manifest(export_dir: Path, cfg, vocab, graphs: dict[str, Any], decode: dict[str, Any],
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the files now in ``export_dir`` (``cfg``: core.model.ModelConfig; ``vocab``: its Vocabulary)."""
    torchscript = "encoder_ts" in graphs
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_config": cfg.to_dict(),
        "dims": {
            "vocab_size": cfg.vocab_size,
            "encoded_size": cfg.encoded_size,
            "num_pixels": cfg.num_pixels,  # P
            "encoder_dim": cfg.encoder_dim,  # C
            "attention_dim": cfg.attention_dim,  # A
            "decoder_dim": cfg.decoder_dim,  # D
            "embed_dim": cfg.embed_dim,
        },
        "preprocess": default_preprocess(cfg.image_size),
        "tokens": {"pad_id": vocab.pad_id, "start_id": vocab.start_id, "end_id": vocab.end_id,
                   "unk_id": vocab.unk_id, "pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"},
        "decode": {"length_norm": 0.0, **decode},
        "io": _IO,
        "opset": graphs["encoder"]["opset"],
        "exporter": {
            "onnx": "+".join(sorted({graphs[g]["exporter"] for g in ("encoder", "decoder_step")})),
            "torchscript": "torch.jit.trace (legacy: TorchScript is deprecated upstream in favour of torch.export)"
            if torchscript else None,
            "versions": versions(),
        },
        "graphs": graphs,
        "files": file_entries(export_dir),
        "source": source or {},
    }


def write_manifest(export_dir: Path, manifest: dict[str, Any]) -> Path:
    return atomic_write_text(Path(export_dir) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
