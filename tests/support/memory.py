"""Peak memory of `python -m export.caption` on a folder of N small images: it must not grow with N.

    python tests/support/memory.py [--small 500] [--large 5000] [--size 48] [--batch-size 16] [--work DIR]

Builds a tiny model (resnet18 at 32 px, random weights) and exports it, writes the images (hard links to 64
distinct synthetic JPEGs, so writing 5,000 takes a second), then captions each folder in a fresh process and
reads that process's peak RSS from getrusage(RUSAGE_CHILDREN) in a wrapper process. Used by
tests/robustness/test_robustness_memory.py (marked slow).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc, round(time.perf_counter() - t, 2))\n"
)


def make_export(work: Path) -> Path:
    import torch

    from core.model import CaptionModel, ModelConfig
    from core.vocab import Vocabulary
    from export.to_onnx import export_model

    out = work / "exported"
    if (out / "manifest.json").is_file():
        return out
    torch.manual_seed(0)
    vocab = Vocabulary.build(["a red circle", "a blue square above a red circle", "two small shapes"])
    cfg = ModelConfig(vocab_size=len(vocab), backbone="resnet18", encoded_size=2, image_size=32, attention_dim=16,
                      embed_dim=8, decoder_dim=16)
    export_model(CaptionModel(cfg).eval(), vocab, out, torchscript=False, safetensors=False, num_calib=2)
    return out


def make_folder(work: Path, n: int, size: int) -> Path:
    from core.synthetic import generate

    src = work / "distinct"
    if not (src / "Images").is_dir():
        generate(src, 64, seed=5, size=size)
    originals = sorted((src / "Images").iterdir())
    d = work / f"images_{n}"
    if d.is_dir() and len(list(d.iterdir())) == n:
        return d
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        os.link(originals[i % len(originals)], d / f"{i:06d}.jpg")
    return d


def peak_rss_mb(folder: Path, export_dir: Path, batch_size: int) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of captioning every image of ``folder`` in a fresh process."""
    cmd = [sys.executable, "-m", "export.caption", str(folder), "--model", str(export_dir), "--backend", "ort",
           "--beam-size", "1", "--max-decode-len", "6", "--batch-size", str(batch_size), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"wrapper failed: {proc.stderr[-2000:]}")
    kb, rc, seconds = proc.stdout.split()
    if rc != "0":
        raise RuntimeError(f"export.caption exited {rc} on {folder}")
    return int(kb) / 1024, float(seconds)


def measure(work: Path, small: int = 500, large: int = 5000, size: int = 48, batch_size: int = 16) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    export_dir = make_export(work)
    result = {"image_size_px": size, "batch_size": batch_size}
    for n in (small, large):
        mb, s = peak_rss_mb(make_folder(work, n, size), export_dir, batch_size)
        result[n] = {"peak_rss_mib": round(mb, 1), "seconds": s}
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--large", type=int, default=5000)
    p.add_argument("--size", type=int, default=48, help="image side in px (32..64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(args.work or Path(tmp), args.small, args.large, args.size, args.batch_size)
    print(json.dumps(r, indent=1))
    a, b = r[args.small]["peak_rss_mib"], r[args.large]["peak_rss_mib"]
    print(f"peak RSS: {args.small} images {a:.0f} MiB, {args.large} images {b:.0f} MiB (ratio {b / a:.2f}); "
          f"total {time.perf_counter() - t:.0f} s")
    return 0 if b < 1.25 * a + 50 else 1


if __name__ == "__main__":
    raise SystemExit(main())
