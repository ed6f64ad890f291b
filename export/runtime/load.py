"""Load an exported captioning model: a backend by name, path and precision, and the Captioner every command uses.

    from export.runtime import load_backend, Captioner
    backend = load_backend("ort", "exported/")              # or "torchscript", or "eager" with a .pt checkpoint
    backend = load_backend("ort", "exported/", precision="auto")   # int8 where the export validated it (see below)
    captioner = Captioner(backend, beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

    add_model_args(parser)                                   # the model flags of the caption command and the server
    captioner = load_captioner(parser.parse_args())          # ... and what they load

:func:`load_backend` picks a backend by name and path, and a precision: ``fp32`` (default), ``int8`` (int8 encoder
+ int8 step, ``export --quantize int8``), ``bf16`` (eager encoder under bf16 autocast + the fp32 step), ``fp16``
(the fp16 graphs, ONNX Runtime on CUDA) or ``auto``: the fastest path the export validated and this machine runs
natively (``core.hardware.choose_precision``, logged).
An export directory is self-contained (see export/manifest.py): running it needs core.decode, core.vocab and
core.images, never the training code or the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from core import hardware
from core.cli import positive_int
from core.decode import BAD_ENDINGS, SAMPLE_METHODS
from export.manifest import (
    DEFAULT_MAX_LEN,
    ENCODER_INT8_ONNX,
    MANIFEST,
    SAFETENSORS,
    ExportFormatError,
    check_pinned,
    read_manifest,
)
from export.runtime.backends import Backend, Bf16EncoderBackend, EagerBackend, OrtBackend, TorchScriptBackend
from export.runtime.captioner import Captioner, decode_controls

BACKENDS = ("ort", "torchscript", "eager")
PRECISIONS = (*hardware.PRECISIONS, "fp16")  # fp16: the fp16 graphs, ONNX Runtime on CUDA
log = logging.getLogger("sat.export.runtime")


def int8_record(manifest: dict | None) -> dict | None:
    """What the export says of its int8 encoder + step path (None: it has none)."""
    q = ((manifest or {}).get("quantization") or {}).get("int8_path")
    if not q or ENCODER_INT8_ONNX not in (manifest or {}).get("files", {}):
        return None
    return {"validated": bool(q.get("validated")), "weight_format": q.get("weight_format"), "why": q.get("why", "")}


def resolve_precision(requested: str, path: Path, backend: str, device: str | None) -> hardware.Choice:
    """--precision of a backend and export, through core.hardware.choose_precision; logged with its reason."""
    if requested not in hardware.PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(hardware.PRECISIONS)}, got {requested!r}")
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
                 device: str | None = None, verify: bool = True, precision: str = "fp32",
                 expect_sha256: str | None = None) -> Backend:
    """``name`` in ort|torchscript|eager. ``path``: an export directory; for eager also a checkpoint .pt.

    eager + directory: the export's model.safetensors (written by export/to_onnx.py unless --no-safetensors),
    or a directory holding only model.safetensors + model.json (core.checkpoint.save_safetensors).
    ``precision``: fp32 | int8 | bf16 | fp16 | auto (module docstring). The backend's ``precision`` attribute holds
    the choice (a core.hardware.Choice).
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
    if precision in ("fp32", "fp16"):
        backend = _load(name, path, providers, threads, False, precision == "fp16", device, verify)
        backend.precision = hardware.Choice(precision, "requested")
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


# ------------------------------------------------------------------------------ what every command shares
def add_model_args(p: argparse.ArgumentParser, beam_size: int = 5) -> None:
    """The flags that say which model to load and how to decode: the caption command's and the server's."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "--checkpoint", dest="model", type=Path, default=Path("exported"),
                   help="export directory (default exported/); for --backend eager also a checkpoint .pt")
    g.add_argument("--backend", choices=BACKENDS, default="ort", help="runtime (default ort)")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): int8 where the export validated it and this CPU runs it natively, else fp32; "
                        "int8: int8 encoder + step (export --quantize int8); bf16: eager bf16 encoder + fp32 step; "
                        "fp16: the fp16 graphs on CUDA (export --fp16)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="inference threads, ORT intra-op and torch (default: every core this process may use)")
    g.add_argument("--beam-size", type=positive_int, default=beam_size,
                   help=f"beam size; 1 is greedy (default {beam_size})")
    g.add_argument("--max-decode-len", type=positive_int, default=None,
                   help=f"longest generated caption in words (default: the model's recorded one, else {DEFAULT_MAX_LEN})")
    g.add_argument("--length-norm", type=float, default=0.0, help="rank by score / length**a (default 0: raw sum)")
    g.add_argument("--search", choices=["default", "tutorial"], default="default",
                   help="default: keeps every finished caption; tutorial: the decisions of the PyTorch tutorial's "
                        "caption_image_beam_search (its captions, word for word; see docs/tutorial.md)")
    add_decode_args(p)
    g.add_argument("--no-verify", action="store_true", help="skip the manifest sha256 check of the model files")
    g.add_argument("--expect-sha256", metavar="HEX", default=None,
                   help="refuse the model unless manifest.json (or the checkpoint file) has this sha256, the one "
                        "the exporter logged: the manifest's hashes only catch files changed without it")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    """The decoding controls (core.decode.DecodeControls; docs/decoding.md); their defaults change nothing."""
    g = p.add_argument_group("decoding controls (docs/decoding.md)")
    g.add_argument("--sample-method", choices=SAMPLE_METHODS, default="greedy",
                   help="greedy (default): the beam search; sample: draw each word from the softmax; top-k / top-p: "
                        "from the k most likely words / the smallest set of probability p")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling: divide the log-probabilities by this")
    g.add_argument("--top-k", type=positive_int, default=None, help="with --sample-method top-k: k")
    g.add_argument("--top-p", type=float, default=None, help="with --sample-method top-p: p in (0, 1]")
    g.add_argument("--sample-n", type=positive_int, default=1, help="sampling: captions per image (default 1)")
    g.add_argument("--seed", type=int, default=None, help="sampling: seed (the same seed, the same captions)")
    g.add_argument("--beam-groups", type=positive_int, default=1,
                   help="diverse beam search: split --beam-size beams into this many groups, one caption each")
    g.add_argument("--diversity", type=float, default=0.5,
                   help="diverse beam search: penalty per earlier group that chose the same word at the same step")
    g.add_argument("--block-trigrams", action="store_true", help="never repeat a trigram within a caption")
    g.add_argument("--bad-endings", nargs="?", const=",".join(BAD_ENDINGS), default="", metavar="WORDS",
                   help="a caption may not end on one of these comma-separated words (alone: "
                        f"{','.join(BAD_ENDINGS)}); enforced inside the search")


def check_decode_args(args: argparse.Namespace) -> None:
    """A ValueError naming the flag when the decoding controls cannot work together (before any model loads)."""
    try:
        controls_from_args(args, None)
    except ValueError as e:
        raise ValueError(f"decoding controls: {e} (--sample-method, --temperature, --top-k, --top-p, --sample-n, "
                         f"--beam-groups, --diversity)") from None
    if args.beam_size % args.beam_groups:
        raise ValueError(f"--beam-size ({args.beam_size}) must be a multiple of --beam-groups ({args.beam_groups})")


def controls_from_args(args: argparse.Namespace, vocab):
    """core.decode.DecodeControls from the flags of :func:`add_decode_args` (a ValueError names a bad value)."""
    words = [w.strip() for w in args.bad_endings.split(",") if w.strip()]
    return decode_controls(vocab, bad_endings=words if vocab is not None else (), sample_method=args.sample_method, temperature=args.temperature,
                           top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                           sample_n=args.sample_n, seed=args.seed, beam_groups=args.beam_groups,
                           diversity=args.diversity, block_trigrams=args.block_trigrams)


def inference_threads(requested: int | None) -> tuple[int, str]:
    """(threads, why). Every core by default: the inference pools sleep while idle (export.runtime.backends), so
    they leave the cores to the search, the event loop and the decode threads between runs."""
    if requested:
        return requested, "--threads"
    cores = hardware.cpu_cores()
    return cores, f"the {cores} cores this process may use"


def load_captioner(args: argparse.Namespace) -> Captioner:
    """The Captioner of the flags :func:`add_model_args` added; errors are those of :func:`model_load_errors`."""
    threads, why = inference_threads(args.threads)
    log.debug("inference threads: %d (%s)", threads, why)
    torch.set_num_threads(threads)  # torch runs the beam search's own ops: its idle OpenMP threads spin otherwise
    backend = load_backend(args.backend, args.model, threads=threads, device=None if args.device == "auto" else args.device,
                           verify=not args.no_verify, precision=args.precision, expect_sha256=args.expect_sha256)
    return Captioner(backend, beam_size=args.beam_size, max_len=args.max_decode_len, length_norm=args.length_norm,
                     search=args.search, controls=controls_from_args(args, backend.vocab))
