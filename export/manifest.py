"""The export directory's format: file names, graph input/output names, manifest read/verify helpers.

Shared by the exporter (export/to_onnx.py) and the runtime (export/runtime.py). Imports nothing heavy
(no torch, no onnxruntime; ``onnx`` only inside :func:`check_external_data`).

An export directory holds::

    manifest.json          format, dims, preprocessing, special tokens, opset, exporter, sha256 of every file, parity
    vocab.json             core.vocab.Vocabulary.save format
    encoder.onnx           images [N,3,S,S] -> enc_out [N,P,C], enc_att [N,P,A], h [N,D], c [N,D]
    decoder_step.onnx      words [M], h [M,D], c [M,D], enc_out [N,P,C], enc_att [N,P,A] -> logprobs [M,V], h, c, alpha [M,P]
    decoder_step.int8.onnx (--quantize int8) dynamic int8 quantization of the step
    encoder.fp16.onnx, decoder_step.fp16.onnx  (--fp16, CUDA only) float32 interface, float16 inside
    encoder.ts, decoder_step.ts                (legacy) TorchScript traces of the same two graphs
    model.safetensors, model.json              weights + config for the eager backend (no pickle)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "sat-export"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
VOCAB = "vocab.json"
ENCODER_ONNX = "encoder.onnx"
STEP_ONNX = "decoder_step.onnx"
STEP_INT8_ONNX = "decoder_step.int8.onnx"
ENCODER_FP16_ONNX = "encoder.fp16.onnx"
STEP_FP16_ONNX = "decoder_step.fp16.onnx"
ENCODER_TS = "encoder.ts"
STEP_TS = "decoder_step.ts"
SAFETENSORS = "model.safetensors"
SAFETENSORS_META = "model.json"

ENCODER_INPUTS = ("images",)
ENCODER_OUTPUTS = ("enc_out", "enc_att", "h", "c")
STEP_INPUTS = ("words", "h", "c", "enc_out", "enc_att")
STEP_OUTPUTS = ("logprobs", "h_next", "c_next", "alpha")


class ExportFormatError(RuntimeError):
    """An export directory or one of its files is missing, corrupt, tampered with or unsafe (names the file)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
            raise ExportFormatError(f"{path}: missing or malformed section {key!r}")
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
