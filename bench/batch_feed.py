"""Ray's cost: ``python -m export.batch_caption`` against ``python -m export.caption``, same JPEGs, same export.

    python bench/batch_feed.py --work /tmp/batch_bench [--count 2000] [--precisions int8,fp32] [--json out.json]

Builds (once, in --work) ``--count`` synthetic JPEGs (core.synthetic, 256 px) and an export of the demo's shapes
(ResNet-18 at 96 px, dims 256, ``./launch.sh demo``'s model; random decoder weights, encoder BatchNorm statistics
measured on the images, int8 encoder + step quantized). Then for each precision, the caption command's loop
(``export.runtime.caption.caption_all``, what its summary line times: model loading excluded) and the batch command
(a subprocess starting a local Ray): images/s of each, their ratio, and whether every caption is the same.

The batch command's images/s is its ``steady`` figure: from its first results to its last, the first batch left out
(Ray's start, the actors' start and model loading are logged apart: a fixed cost per job, not per image). Both use
every core (2 ORT threads; the caption command's loader threads, the batch command's decode tasks).
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
import re
import subprocess
import time

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_SHAPES = dict(backbone="resnet18", image_size=96, encoded_size=3, attention_dim=256, embed_dim=256,
                   decoder_dim=256, dropout=0.0)


def make_inputs(work: Path, count: int) -> tuple[Path, Path]:
    """(folder of ``count`` JPEGs, export directory), built once under ``work``."""
    from core.synthetic import generate

    data = work / "data"
    images = data / "Images"
    if not images.is_dir() or len(list(images.glob("*.jpg"))) != count:
        generate(data, count, seed=0, size=256)
    export_dir = work / "exported"
    if not (export_dir / "manifest.json").is_file():
        make_export(data, export_dir)
    return images, export_dir


def make_export(data_dir: Path, export_dir: Path) -> None:
    from bench.suite import calibrate_batchnorm
    from core.data import load_dataset
    from core.images import image_transform, load_image
    from core.model import CaptionModel, ModelConfig
    from export.to_onnx import export_model

    data = load_dataset(data_dir)
    vocab = data.build_vocab()
    torch.manual_seed(0)
    model = CaptionModel(ModelConfig(vocab_size=len(vocab), **DEMO_SHAPES)).eval()
    tf = image_transform(DEMO_SHAPES["image_size"], train=False)
    names = data.splits["train"][:64]
    images = torch.stack([tf(load_image(data.image_path(n))) for n in names])  # [64,3,96,96]
    calibrate_batchnorm(model.encoder, images)  # statistics of real images: features of a sane scale, as trained
    export_model(model, vocab, export_dir, quantize="int8", quant_images=images[:32], calib_images=images[32:40],
                 num_calib=8)


def caption_rate(images: Path, export_dir: Path, precision: str, batch: int) -> tuple[float, dict[str, str]]:
    """(images/s, {path: caption}) of the caption command's own loop, model loading excluded."""
    from export.runtime import caption

    args = caption.build_parser().parse_args([str(images), "--model", str(export_dir), "--precision", precision,
                                              "--batch-size", str(batch), "--json", "--progress-every", "1000000"])
    inputs = caption.gather_inputs(args)
    captioner = caption.load_captioner(args)
    captioner.caption_tensors(captioner.load(inputs.paths[0])[None])  # warm-up
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        tally = caption.caption_all(args, captioner, inputs)
    seconds = time.perf_counter() - t0
    if tally.failed:
        raise SystemExit(f"error: the caption command failed on {tally.failed} images")
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    return len(rows) / seconds, {r["file"]: r["caption"] for r in rows}


def run_batch(images: Path, export_dir: Path, precision: str, out_dir: Path, extra: list[str]) -> tuple[dict, dict]:
    """(figures from the batch command's log, {path: caption}) of one fresh run into ``out_dir``."""
    import pyarrow.parquet as pq

    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "export.batch_caption", str(images), "--model", str(export_dir),
                           "--out", str(out_dir), "--precision", precision, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: batch_caption failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    m = re.search(r"in ([\d.]+) s \(([\d.]+) images/s overall; steady ([\d.]+) images/s\)", proc.stderr)
    ready = re.search(r"Ray ready in ([\d.]+) s", proc.stderr)
    first = re.search(r"first results ([\d.]+) s after", proc.stderr)
    plan = re.search(r"plan: (.*)", proc.stderr)
    figures = {"job_s": float(m.group(1)), "overall_images_per_s": float(m.group(2)),
               "steady_images_per_s": float(m.group(3)), "ray_start_s": float(ready.group(1)),
               "first_results_s": float(first.group(1)), "command_wall_s": round(wall, 1),
               "plan": plan.group(1) if plan else ""}
    rows = pq.read_table(str(out_dir)).to_pylist()
    if any(r["error"] for r in rows):
        raise SystemExit(f"error: batch_caption failed on {sum(bool(r['error']) for r in rows)} images")
    return figures, {r["path"]: r["caption"] for r in rows}


def compare(images: Path, export_dir: Path, precision: str, work: Path, batch: int, extra: list[str]) -> dict:
    """One precision: the caption command's rate, the batch command's, their ratio, and caption identity."""
    cap_rate, cap_captions = caption_rate(images, export_dir, precision, batch)
    figures, batch_captions = run_batch(images, export_dir, precision, work / f"out_{precision}", extra)
    differ = [p for p in cap_captions if batch_captions.get(p) != cap_captions[p]]
    return {"precision": precision, "images": len(cap_captions), "caption_images_per_s": round(cap_rate, 1),
            "batch": figures, "ratio": round(figures["steady_images_per_s"] / cap_rate, 3),
            "rows": len(batch_captions), "captions_differ": len(differ)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the images, the export and the outputs")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--precisions", default="int8,fp32")
    p.add_argument("--batch-size", type=int, default=32, help="both commands' batch (default 32)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("extra", nargs="*", help="more flags for batch_caption (after --)")
    args = p.parse_args(argv)
    images, export_dir = make_inputs(args.work, args.count)
    results = [compare(images, export_dir, prec, args.work, args.batch_size, ["--batch-size", str(args.batch_size),
                                                                                *args.extra])
               for prec in args.precisions.split(",")]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
