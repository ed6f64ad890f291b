"""Does loading keep up? ``python -m export.caption`` on a folder of JPEGs against the encoder + search rate alone.

    python bench/caption_feed.py --model /tmp/demo_native/exported --images /tmp/demo_native/data/Images \\
        --count 500 --batch-size 32 [--precision auto] [--threads 2] [--json out.json]

Three rates at the same batch size, images per second: ``load`` (decode + resize alone, the captioner's thread
pool), ``compute`` (the images already in memory: encode + beam search, no files), and ``cli`` (the caption
command itself, ``export.runtime.caption.main`` with stdout discarded: files -> captions, loading overlapped with
compute). The acceptance of issue 13 is cli >= 0.9 x compute. Run it on a quiet machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import io
import json
import os
import tempfile
import time

import torch

from core.images import IMAGE_EXTENSIONS


def image_files(folder: Path, count: int) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[:count]
    if len(files) < count:
        raise SystemExit(f"error: {folder} holds {len(files)} images, {count} asked (--count)")
    return files


def compute_rate(captioner, images: torch.Tensor, batch: int) -> float:
    """Images/s of encode + beam search over images already in memory."""
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        captioner.caption_tensors(images[i : i + batch])
    return len(images) / (time.perf_counter() - t0)


def cli_rate(args, files: list[Path]) -> float:
    """Images/s of the caption command's own loop (export.runtime.caption.caption_all, what its summary line times:
    model loading excluded), stdout discarded."""
    from export.runtime import caption

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(str(p) for p in files))
    argv = ["--file-list", f.name, "--model", str(args.model), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--progress-every", str(len(files) + 1)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    try:
        cli_args = caption.build_parser().parse_args(argv)
        inputs = caption.gather_inputs(cli_args)
        captioner = caption.load_captioner(cli_args)
        captioner.caption_tensors(captioner.load(files[0])[None])  # warm-up, as compute_rate's
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            tally = caption.caption_all(cli_args, captioner, inputs)
        seconds = time.perf_counter() - t0
    finally:
        os.unlink(f.name)
    if tally.failed:
        raise SystemExit(f"error: {tally.failed} images failed")
    return len(files) / seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="export directory")
    p.add_argument("--images", type=Path, required=True, help="folder of image files")
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "int8", "bf16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2, help="alternated runs of each measurement (best kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    from export.runtime import Captioner, load_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    files = image_files(args.images, args.count)
    captioner = Captioner(load_backend("ort", args.model, threads=args.threads, precision=args.precision))
    t0 = time.perf_counter()
    images = torch.stack([captioner.load(f) for f in files])  # one thread: what loading costs without overlap
    load = len(files) / (time.perf_counter() - t0)
    captioner.caption_tensors(images[: args.batch_size])  # warm-up
    compute = cli = 0.0
    for _ in range(args.repeats):  # alternated, best of each: a shared machine's noise hits both alike
        compute = max(compute, compute_rate(captioner, images, args.batch_size))
        cli = max(cli, cli_rate(args, files))
    out = {"images": len(files), "batch_size": args.batch_size, "precision": captioner.backend.precision.value,
           "load_images_per_s_1_thread": round(load, 1), "compute_images_per_s": round(compute, 1),
           "cli_images_per_s": round(cli, 1), "cli_over_compute": round(cli / compute, 3)}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
