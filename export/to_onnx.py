"""Export a trained captioning model for deployment: ONNX graphs, vocabulary, manifest, parity figures.

    python export/to_onnx.py --checkpoint runs/x/best.pt --out exported/ [--quantize int8] [--fp16] [--torchscript]
    python export/to_onnx.py --checkpoint runs/x/best.pt --quantize int8 --calib-data DATA --calib-images 64

Defaults: the newest runs/**/best.pt, out ``exported/``, ``--max-decode-len`` the checkpoint's recorded caption length
(else 20). Writes (see export/manifest.py for the format)::

    encoder.onnx        images [N,3,S,S] -> enc_out [N,P,C], enc_att [N,P,A], h [N,D], c [N,D]
    decoder_step.onnx   words [M], h, c [M,D], enc_out [N,P,C], enc_att [N,P,A] -> logprobs [M,V], h, c, alpha [M,P]
    model.safetensors + model.json (eager backend), vocab.json, manifest.json
    [encoder.int8.onnx + decoder_step.int8.onnx with --quantize int8, *.fp16.onnx with --fp16 on CUDA, *.ts with
     --torchscript]

int8: the encoder is calibrated on --calib-images images of the training split of --calib-data (default: the
dataset the checkpoint was trained on, when it is on disk), then the int8 encoder + int8 step are checked against
fp32 on --check-images held-out images of --split: identical captions and BLEU-4 against the references go into
the manifest, and below the threshold (export/parity.py) the runtime's --precision auto keeps to fp32.

The steps: graphs (export/graphs.py), int8 (export/quantize.py), parity with eager PyTorch through the runtime
(export/parity.py), manifest (export/manifest.py). The export fails (exit 1, nothing replaced) when a backend is
off by more than the tolerance. The directory is staged next to its destination and renamed into place only
once everything passed, readable by other users (as the umask allows).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python export/to_onnx.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core import hardware
from core.logs import add_verbosity_args, setup_logging
from core.model import CaptionModel
from core.vocab import Vocabulary
from export import manifest as fmt
from export import parity
from export.graphs import DEFAULT_OPSET, ExportError, export_fp16, export_fp32, export_torchscript
from export.quantize import quantize_encoder_int8, quantize_step_int8

log = logging.getLogger("sat.export")


class ParityError(ExportError):
    """A graph is beyond tolerance; its staged directory is kept for inspection."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    quantize: str | None = None  # None or "int8"
    fp16: bool = False
    torchscript: bool = False
    safetensors: bool = True
    max_len: int = fmt.DEFAULT_MAX_LEN
    beam_size: int = 5
    seed: int = 0
    int8_portable: bool = False  # 7-bit int8 weights even on a VNNI CPU (core.hardware.choose_int8)


def _fp16_graphs(model: CaptionModel, out: Path, opt: ExportOptions) -> dict[str, Any]:
    if not hardware.detect().cuda:
        reason = "--fp16 needs a CUDA GPU (none is visible); fp16 graphs were not exported"
        log.warning("fp16 skipped: %s", reason)
        return {"skipped": reason}
    return export_fp16(model, out, opt.opset, opt.seed)


def _int8_graphs(out: Path, opt: ExportOptions, quant_images: Tensor) -> dict[str, Any]:
    choice = hardware.choose_int8(hardware.detect(), portable=opt.int8_portable)
    log.info("int8 weight format: %s", choice)
    return {"decoder_step_int8": {"file": fmt.STEP_INT8_ONNX, **quantize_step_int8(
                out / fmt.STEP_ONNX, out / fmt.STEP_INT8_ONNX, choice)},
            "encoder_int8": {"file": fmt.ENCODER_INT8_ONNX, **quantize_encoder_int8(
                out / fmt.ENCODER_ONNX, out / fmt.ENCODER_INT8_ONNX, quant_images, choice)}}


def write_files(model: CaptionModel, vocab: Vocabulary, out: Path, opt: ExportOptions,
                source: dict[str, Any] | None, quant_images: Tensor | None = None) -> dict[str, Any]:
    """Every file of the export into ``out``, and its manifest (without parity figures yet)."""
    graphs = export_fp32(model, out, opt.opset, opt.seed)
    if opt.torchscript:
        graphs.update(export_torchscript(model, out, opt.seed))
    if opt.quantize == "int8":
        graphs.update(_int8_graphs(out, opt, quant_images))
    fp16_info = _fp16_graphs(model, out, opt) if opt.fp16 else None
    if fp16_info is not None and "graphs" in fp16_info:
        graphs.update(fp16_info.pop("graphs"))
    vocab.save(out / fmt.VOCAB)
    if opt.safetensors:
        from core.checkpoint import save_safetensors

        save_safetensors(model, vocab, out)
    manifest = fmt.build_manifest(out, model.cfg, vocab, graphs, {"max_len": opt.max_len, "beam_size": opt.beam_size},
                                  source)
    if fp16_info is not None:
        manifest["fp16"] = fp16_info
    fmt.write_manifest(out, manifest)
    return manifest


def check_export(model: CaptionModel, vocab: Vocabulary, out: Path, manifest: dict[str, Any], opt: ExportOptions,
                 tolerance: dict, calib: tuple[Tensor | None, list | None, int]) -> None:
    """Parity figures and caption agreement into ``manifest``; ExportError when a graph is beyond tolerance."""
    s = model.cfg.image_size
    g = torch.Generator().manual_seed(opt.seed + 1)
    images = torch.randn(max(parity.STEP_BATCHES), 3, s, s, generator=g)  # (8, 3, S, S)
    fp16 = "fp16" in manifest and "skipped" not in manifest["fp16"]
    ort_fp32, ort_fp16 = parity.ort_backends(out, fp16)
    manifest["parity"], failures = parity.check_graphs(model, out, ort_fp32, ort_fp16, images, tolerance, opt.seed,
                                                       opt.torchscript)
    if failures:
        fmt.write_manifest(out, manifest)
        raise ParityError("exported graphs differ from eager PyTorch beyond tolerance:\n  " + "\n  ".join(failures[:20])
                          + f"\n(full report in {out / fmt.MANIFEST}, kept for inspection)")
    calib_images, calib_references, num_calib = calib
    if calib_images is None:
        calib_images = torch.randn(num_calib, 3, s, s, generator=g)
        calib_source = f"{num_calib} random images (seed {opt.seed + 1})"
    else:
        calib_source = f"{len(calib_images)} held-out dataset images"
    caps = parity.check_captions(model, vocab, out, ort_fp32, ort_fp16, images, calib_images, calib_source,
                                 calib_references, opt.beam_size, opt.max_len, opt.quantize == "int8")
    manifest["parity"]["captions"] = caps["captions"]
    if "int8" in caps:
        step, enc = manifest["graphs"]["decoder_step_int8"], manifest["graphs"]["encoder_int8"]
        fmt_keys = ("weight_format", "weight_format_reason", "exported_on")
        manifest["quantization"] = {
            "int8": {**caps["int8"], **{k: step[k] for k in fmt_keys}},  # the int8 step, fp32 encoder
            "int8_path": {**caps["int8_path"], **{k: enc[k] for k in fmt_keys},  # what --precision int8 runs
                          "calibration": f"{enc['calibration_images']} {calib_source_of(manifest)}"},
        }
    if "fp16" in caps:
        manifest["fp16"]["captions"] = caps["fp16"]


def _staging_dir(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as e:
        raise ExportError(f"cannot create the export directory {out_dir}: {e.strerror or e}") from e


def _make_readable(directory: Path) -> None:
    """Directory 0777 and files 0666 less the umask: mkdtemp made it 0700, and a service user must read it."""
    umask = os.umask(0)
    os.umask(umask)
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
    os.chmod(directory, 0o777 & ~umask)


def publish(tmp: Path, out_dir: Path) -> None:
    """Move a finished export into place; only an empty dir or a previous export is ever replaced."""
    _make_readable(tmp)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / fmt.MANIFEST).is_file():
        raise ExportError(f"refusing to replace {out_dir}: it is not empty and holds no {fmt.MANIFEST}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def calib_source_of(manifest: dict[str, Any]) -> str:
    return (manifest.get("source") or {}).get("int8_calibration", "random images (no calibration data given)")


def _random_quant_images(model: CaptionModel, quant_images: Tensor | None, opt: ExportOptions) -> Tensor:
    if quant_images is not None or opt.quantize != "int8":
        return quant_images
    log.warning("int8 encoder calibrated on random images (no calibration data): pass --calib-data DATA_DIR")
    s = model.cfg.image_size
    return torch.randn(16, 3, s, s, generator=torch.Generator().manual_seed(opt.seed + 2))


def export_model(model: CaptionModel, vocab: Vocabulary, out_dir: str | os.PathLike, *,
                 calib_images: Tensor | None = None, calib_references: list | None = None, num_calib: int = 32,
                 tolerance: dict | None = None, source: dict[str, Any] | None = None,
                 quant_images: Tensor | None = None, **options: Any) -> dict[str, Any]:
    """Export ``model`` into ``out_dir`` and return the manifest (also written as out_dir/manifest.json).

    ``options``: the fields of :class:`ExportOptions` (opset, quantize, fp16, torchscript, safetensors, max_len,
    beam_size, seed). Raises ExportError (nothing at ``out_dir`` is touched) when a graph fails the checker or
    parity. ``calib_images`` (preprocessed [N,3,S,S], held-out) and ``calib_references`` (tokenized references per
    image) feed the int8/fp16 caption-agreement check; without them ``num_calib`` random images are used.
    ``quant_images`` ([N,3,S,S], training images) calibrate the int8 encoder's activation ranges.
    """
    opt = ExportOptions(**options)
    if opt.quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or int8, got {opt.quantize}")
    if len(vocab) != model.cfg.vocab_size:
        raise ExportError(f"vocabulary has {len(vocab)} words but the model expects {model.cfg.vocab_size}")
    # a private fp32 CPU copy: the caller's model keeps its device, dtype and train/eval mode
    model = copy.deepcopy(getattr(model, "module", model)).eval().float().cpu()
    out_dir = Path(out_dir)
    tmp = _staging_dir(out_dir)
    t_start = time.perf_counter()
    try:
        if quant_images is not None and opt.quantize:
            source = {"int8_calibration": "images passed to export_model", **(source or {})}
        manifest = write_files(model, vocab, tmp, opt, source, _random_quant_images(model, quant_images, opt))
        check_export(model, vocab, tmp, manifest, opt, tolerance or parity.TOLERANCE,
                     (calib_images, calib_references, num_calib))
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 1)
        fmt.write_manifest(tmp, manifest)
        publish(tmp, out_dir)
    except BaseException as e:
        if not isinstance(e, ParityError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s in %.1f s; manifest sha256 %s (pin it: caption --expect-sha256)", out_dir,
             manifest["export_seconds"], fmt.sha256_file(Path(out_dir) / fmt.MANIFEST))
    return manifest


# ---------------------------------------------------------------------------------------------------- CLI
def newest_checkpoint(root: Path = Path("runs")) -> Path:
    found = sorted(root.glob("**/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ExportError(f"no checkpoint given and no {root}/**/best.pt found: pass --checkpoint RUN/best.pt")
    return found[-1]


def caption_max_len(requested: int | None, state: dict[str, Any]) -> int:
    """--max-decode-len, else the length the checkpoint records (an imported tutorial model: 51), else the default."""
    return requested or (state.get("decode") or {}).get("max_len", fmt.DEFAULT_MAX_LEN)


def _split_images(data, split: str, image_size: int, limit: int):
    """(images [N,3,S,S], tokenized references) of the first ``limit`` images of a dataset split."""
    from core.splits import SPLIT_NAMES

    if split not in SPLIT_NAMES:
        raise ExportError(f"--split {split}: no such split; choose from {', '.join(SPLIT_NAMES)}")
    names = data.splits[split][:limit]
    if not names:
        raise ExportError(f"split {split} of the calibration data is empty")
    return data.eval_images(names, image_size), data.tokenized_references(names)


def calibration_data(requested: Path | None, state: dict[str, Any]) -> tuple[Any, str] | None:
    """The dataset (split as in training) for int8 calibration and the held-out check: --calib-data, else the
    checkpoint's own training data when it is on disk; None when neither is there."""
    from core.data import load_dataset

    train = state.get("train_config") or {}
    data_dir = requested or (Path(train["data"]) if train.get("data") else None)
    if data_dir is None or (requested is None and not data_dir.is_dir()):
        return None
    split_args = {k: train[k] for k in ("split_seed", "val_frac", "test_frac") if k in train}
    if "split_seed" in split_args:
        split_args["seed"] = split_args.pop("split_seed")
    if requested is None and train.get("dataset"):
        split_args["dataset"] = train["dataset"]  # the layout training read (--calib-data is detected)
    why = "--calib-data" if requested else "the checkpoint's training data"
    log.info("calibration and check images from %s (%s)", data_dir, why)
    return load_dataset(data_dir, train.get("karpathy_json"), **split_args), f"{data_dir} ({why})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/to_onnx.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", "--model", dest="checkpoint", type=Path, default=None,
                   help="checkpoint .pt (default: newest runs/**/best.pt)")
    p.add_argument("--out", type=Path, default=Path("exported"), help="export directory (default: exported/)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write encoder.int8.onnx (static, calibrated) and decoder_step.int8.onnx (dynamic)")
    p.add_argument("--int8-portable", action="store_true",
                   help="7-bit int8 weights even on a VNNI CPU, for files that must run on CPUs without VNNI")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (needs a CUDA GPU; skipped on CPU)")
    p.add_argument("--torchscript", action=argparse.BooleanOptionalAction, default=False,
                   help="also write TorchScript traces (default off: they triple the size, and are deprecated upstream)")
    p.add_argument("--no-safetensors", action="store_true", help="skip model.safetensors (eager backend weights)")
    p.add_argument("--max-decode-len", type=int, default=None,
                   help=f"caption length recorded in the manifest (default: the checkpoint's, else {fmt.DEFAULT_MAX_LEN})")
    p.add_argument("--beam-size", type=int, default=5, help="default beam size recorded (and used for int8 agreement)")
    p.add_argument("--calib-data", type=Path, default=None,
                   help="Flickr8k-layout dataset: its train split calibrates the int8 encoder, --split is the held-out "
                        "check (default: the checkpoint's training data, when it is on disk)")
    p.add_argument("--calib-images", type=int, default=64, help="training images that calibrate the int8 encoder")
    p.add_argument("--split", default="test", help="held-out split of --calib-data for the caption check (default test)")
    p.add_argument("--check-images", type=int, default=200,
                   help="held-out images for the int8/fp16 caption check (default 200)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    add_verbosity_args(p)
    return p


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from core.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = args.checkpoint or newest_checkpoint()
    log.info("checkpoint %s", ckpt)
    state = load_checkpoint(ckpt)
    model, vocab = model_from_checkpoint(state, ckpt)
    max_len = caption_max_len(args.max_decode_len, state)
    source = {"checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": fmt.sha256_file(ckpt)}
    check, refs, quant = None, None, None
    found = calibration_data(args.calib_data, state) if args.quantize or args.fp16 else None  # only they use it
    if found:
        data, where = found
        check, refs = _split_images(data, args.split, model.cfg.image_size, args.check_images)
        if args.quantize:
            quant = _split_images(data, "train", model.cfg.image_size, args.calib_images)[0]
            source["int8_calibration"] = f"training images of {where}"
    return export_model(model, vocab, args.out, opset=args.opset, quantize=args.quantize, fp16=args.fp16,
                        torchscript=args.torchscript, safetensors=not args.no_safetensors, max_len=max_len,
                        beam_size=args.beam_size, calib_images=check, calib_references=refs,
                        num_calib=args.check_images, quant_images=quant, source=source, seed=args.seed,
                        int8_portable=args.int8_portable)


def _print_summary(out: Path, manifest: dict[str, Any]) -> None:
    par = manifest["parity"]
    w = par["onnx"]["worst"]
    print(f"exported {out}: opset {manifest['opset']}, exporter {manifest['exporter']['onnx']}; "
          f"ONNX vs eager: encoder rel {w['encoder_rel']:.2e}, logprobs {w['logprobs_max_abs']:.2e}, "
          f"alpha {w['alpha_max_abs']:.2e}; beam-3 captions identical {par['captions']['identical_pct']}%")
    if "torchscript" in par:
        w = par["torchscript"]["worst"]
        print(f"TorchScript vs eager: encoder rel {w['encoder_rel']:.2e}, logprobs {w['logprobs_max_abs']:.2e}")
    for key, name in (("int8", "int8 step"), ("int8_path", "int8 encoder + step")):
        q = manifest.get("quantization", {}).get(key)
        if q:
            verdict = "validated" if q["validated"] else "NOT validated (--precision auto keeps fp32)"
            print(f"{name}: {q['why']}, beam {q['beam_size']} ({q['check_set']}): {verdict}")
    if "fp16" in manifest and "skipped" in manifest["fp16"]:
        print(f"fp16: skipped ({manifest['fp16']['skipped']})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("export", args.verbose - args.quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    log.info("hardware: %s", hardware.summary())
    from core.checkpoint import CheckpointError
    from core.data import DataFormatError, DatasetNotFoundError
    from core.fileio import WriteError
    from core.images import ImageLoadError

    try:
        manifest = _run(args)
    except (ExportError, CheckpointError, DataFormatError, DatasetNotFoundError, ImageLoadError, WriteError,
            fmt.ExportFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, file size limit, permissions: nothing was installed
        print(f"error: export to {args.out} failed: {e}", file=sys.stderr)
        return 1
    _print_summary(args.out, manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
