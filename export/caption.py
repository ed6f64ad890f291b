"""Caption image files with an exported model (ONNX Runtime, TorchScript or eager PyTorch).

    python -m export.caption IMG [IMG|DIR ...] --model exported/ --backend ort --beam 5 [--json] [--save-dir DIR]
    python -m export.caption --data DATA_DIR --split test --limit 8 --model exported/     # held-out dataset images
    python -m export.caption --file-list files.txt --model runs/x/best.pt --backend eager
    python -m export.caption IMG --model tutorial.pt --backend eager --search tutorial  # the tutorial's captions

Output, one line per image on stdout: ``path<TAB>caption``, or with --json a JSON object per line
``{"file", "caption", "score"}``. A file that is not a readable image gets an ``error: ...`` line on stderr naming
it (``{"file", "error"}`` on stdout with --json); the others are still captioned and the exit code is 1.
Directories are expanded to the image files they hold (not recursive). With --data, BLEU-1..4 and CIDEr-D
against the dataset's reference captions are printed on stderr at the end.

--model: an export directory (export/to_onnx.py). With --backend eager it may also be a checkpoint .pt; an
export directory works for eager too, through the model.safetensors the exporter writes there.
--save-dir DIR writes DIR/<name>.png (image with its caption) and DIR/<name>_attention.png (one attention map
per word).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from core.images import IMAGE_EXTENSIONS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("inputs", nargs="*", type=Path, help="image files or directories of images")
    p.add_argument("--model", type=Path, default=Path("exported"),
                   help="export directory (default exported/); for --backend eager also a checkpoint .pt")
    p.add_argument("--backend", choices=["ort", "torchscript", "eager"], default="ort", help="runtime (default ort)")
    p.add_argument("--beam", type=int, default=5, help="beam size; 1 is greedy (default 5)")
    p.add_argument("--max-len", type=int, default=None, help="maximum caption length (default: the manifest's, 20)")
    p.add_argument("--length-norm", type=float, default=0.0, help="rank by score / length**a (default 0: raw sum)")
    p.add_argument("--search", choices=["default", "tutorial"], default="default",
                   help="default: keeps every finished caption; tutorial: the decisions of the PyTorch tutorial's "
                        "caption_image_beam_search (its captions, word for word; see README)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (ORT intra-op / torch)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    p.add_argument("--int8", action="store_true", help="ort: use the int8 decoder step (export --quantize int8)")
    p.add_argument("--fp16", action="store_true", help="ort on CUDA: use the fp16 graphs (export --fp16)")
    p.add_argument("--json", action="store_true", help="JSON lines {file, caption, score} instead of path<TAB>caption")
    p.add_argument("--save-dir", type=Path, default=None, help="write captioned images and attention figures here")
    p.add_argument("--file-list", type=Path, default=None, help="text file with one image path per line")
    p.add_argument("--data", type=Path, default=None, help="Flickr8k-layout dataset: caption images of --split")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--limit", type=int, default=None, help="caption at most this many images of --data")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest sha256 check of the model files")
    p.add_argument("-v", "--verbose", action="store_true", help="log backend details")
    return p


def expand_inputs(inputs: Sequence[Path], errors: list[str]) -> Iterator[Path]:
    """Files as given, directories as their image files (sorted); an empty directory is an error."""
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not p.name.startswith("."))
            if not files:
                errors.append(f"{path}: directory holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            yield from files
        else:
            yield path


def read_file_list(path: Path) -> list[Path]:
    base = path.parent
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(p if p.is_absolute() or p.exists() else base / p)
    return out


def _unique_stem(path: str, used: set[str]) -> str:
    stem = Path(path).stem or "image"
    name, i = stem, 2
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from core.data import DataFormatError, DatasetNotFoundError
    from core.checkpoint import CheckpointError
    from export.runtime import Captioner, ExportFormatError, configure_logging, load_backend

    configure_logging("caption", logging.INFO if args.verbose else logging.WARNING)

    if args.threads:
        torch.set_num_threads(args.threads)
    errors: list[str] = []
    references: dict[str, list[list[str]]] = {}
    paths: list[Path] = list(expand_inputs(args.inputs, errors))
    try:
        if args.file_list:
            paths += read_file_list(args.file_list)
        if args.data:
            from core.data import load_flickr8k
            from core.vocab import tokenize

            data = load_flickr8k(args.data)
            names = data.splits[args.split][: args.limit]
            for n in names:
                p = data.image_path(n)
                references[str(p)] = [tokenize(c) for c in data.captions[n]]
                paths.append(p)
    except (OSError, DataFormatError, DatasetNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths and not errors:
        print("error: nothing to caption: give image files or directories, --file-list or --data", file=sys.stderr)
        return 2

    if args.save_dir:
        from core.viz import save_attention_figure, save_captioned_image

        try:
            args.save_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"error: cannot create --save-dir {args.save_dir}: {e.strerror or e}", file=sys.stderr)
            return 2
        used: set[str] = set()

    device = None if args.device == "auto" else args.device
    try:
        backend = load_backend(args.backend, args.model, threads=args.threads, int8=args.int8, fp16=args.fp16,
                               device=device, verify=not args.no_verify)
        captioner = Captioner(backend, beam_size=args.beam, max_len=args.max_len, length_norm=args.length_norm,
                              search=args.search)
    except (ExportFormatError, CheckpointError, RuntimeError, ValueError, OSError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    print(f"[caption] {backend.describe()}, beam {args.beam} ({args.search} search), max_len {captioner.max_len}",
          file=sys.stderr)

    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    failed, captioned = len(errors), 0
    hyps, refs = [], []
    t0 = time.perf_counter()
    for r in captioner.caption_paths(paths, batch_size=args.batch_size, keep_alphas=args.save_dir is not None):
        if not r.ok:
            failed += 1
            print(f"error: {r.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(r.to_json()), flush=True)
            continue
        captioned += 1
        print(json.dumps(r.to_json()) if args.json else f"{r.path}\t{r.caption}", flush=True)
        if r.path in references:
            hyps.append(r.words)
            refs.append(references[r.path])
        if args.save_dir:
            stem = _unique_stem(r.path, used)
            try:
                save_captioned_image(r.path, r.caption, args.save_dir / f"{stem}.png")
                if r.words:
                    grid = int(round(math.sqrt(r.alphas.shape[1])))
                    save_attention_figure(r.path, r.words, r.alphas, grid=grid,
                                          path=args.save_dir / f"{stem}_attention.png")
            except (OSError, ValueError) as e:
                failed += 1
                print(f"error: {r.path}: could not write figures to {args.save_dir}: {e}", file=sys.stderr)
    seconds = time.perf_counter() - t0
    summary = f"[caption] {captioned} captioned, {failed} failed in {seconds:.2f} s"
    if hyps:
        from core.metrics import caption_metrics

        m = caption_metrics(hyps, refs)
        summary += (f"; vs {args.data} references ({len(hyps)} images): BLEU-1 {m['bleu1']:.3f} "
                    f"BLEU-4 {m['bleu4']:.3f} CIDEr-D {m['cider']:.3f}")
    if args.save_dir:
        summary += f"; figures in {args.save_dir}"
    print(summary, file=sys.stderr)
    return 1 if failed else 0


def _main_guarded() -> int:
    try:
        return main()
    except BrokenPipeError:  # `... | head`: the reader left; stop quietly like other Unix tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(_main_guarded())
