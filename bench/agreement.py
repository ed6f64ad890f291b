"""Caption agreement of every approximate path with fp32, on a trained model's held-out images.

    python export/to_onnx.py --checkpoint /tmp/demo_native/run/best.pt --out /tmp/demo_int8 --quantize int8
    python bench/agreement.py --model /tmp/demo_int8 --data /tmp/demo_native/data [--images 600] [--json out.json]
    SAT_BENCH_DEMO_EXPORT=/tmp/demo_int8 SAT_BENCH_DEMO_DATA=/tmp/demo_native/data pytest bench/ -k agreement

The benchmark suite's own model has random weights, whose captions say little about int8 or bf16; this runs the
same paths on a trained model (the demo's) over its test split (the default split, as training made it) and
compares each with ONNX Runtime fp32: identical captions, and BLEU-4 against the references (fp32's and the
path's). Paths: ort_int8 (int8 step), ort_int8enc (int8 encoder), ort_int8full (int8 encoder + step, what
``--precision int8`` runs), bf16 (eager bf16 encoder, where the CPU runs bf16 natively) and auto.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json

from core import hardware

PATHS = ("ort_int8", "ort_int8enc", "ort_int8full", "bf16", "auto")


def held_out(data_dir: Path, split: str, limit: int, image_size: int):
    from core.data import load_dataset

    data = load_dataset(data_dir)
    names = data.splits[split][:limit]
    return data.eval_images(names, image_size), data.tokenized_references(names)


def backends(export_dir: Path, threads: int | None) -> dict:
    from export.runtime import OrtBackend, load_backend

    out = {"ort_int8": OrtBackend(export_dir, providers=["cpu"], threads=threads, int8=True),
           "ort_int8enc": OrtBackend(export_dir, providers=["cpu"], threads=threads, int8_encoder=True),
           "ort_int8full": OrtBackend(export_dir, providers=["cpu"], threads=threads, int8=True, int8_encoder=True),
           "auto": load_backend("ort", export_dir, providers=["cpu"], threads=threads, precision="auto")}
    if hardware.detect().cpu.native_bf16:  # emulated bf16 is ~30x slower: left out
        out["bf16"] = load_backend("ort", export_dir, providers=["cpu"], threads=threads, precision="bf16")
    return out


def agreement(export_dir: Path, data_dir: Path, split: str = "test", limit: int = 600, beam_size: int = 5,
              threads: int | None = None) -> dict:
    from export.parity import caption_agreement, judge_int8
    from export.runtime import OrtBackend

    fp32 = OrtBackend(export_dir, providers=["cpu"], threads=threads)
    images, refs = held_out(data_dir, split, limit, fp32.image_size)
    max_len = int(fp32.decode_defaults.get("max_len", 20))
    rows = {"machine": hardware.capability_tag(), "images": len(images), "split": split, "beam_size": beam_size}
    for name, b in backends(export_dir, threads).items():
        rec = caption_agreement(fp32, b, fp32.vocab, images, beam_size, max_len, references=refs)
        rec["meets_int8_threshold"], rec["why"] = judge_int8(rec)
        if name == "auto":
            rec["precision"] = b.precision.value
        rows[name] = rec
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="export directory made with --quantize int8")
    p.add_argument("--data", type=Path, required=True, help="the model's Flickr8k-layout dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    rows = agreement(args.model, args.data, args.split, args.images, args.beam_size, args.threads)
    for name in PATHS:
        if name in rows:
            print(f"{name:13s} {rows[name]['why']}" + (f" (auto ran {rows[name]['precision']})" if name == "auto" else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
