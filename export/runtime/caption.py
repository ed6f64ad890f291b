"""Caption image files with an exported model (ONNX Runtime, TorchScript or eager PyTorch).

    python -m export.caption IMG [IMG|DIR ...] --model exported/ --backend ort --beam-size 5 [--json] [--save-dir DIR]
    python -m export.caption --data DATA_DIR --split test --limit 8 --model exported/     # held-out dataset images
    python -m export.caption --file-list files.txt --model runs/x/best.pt --backend eager
    python -m export.caption IMG --model tutorial.pt --backend eager --search tutorial  # the tutorial's captions
    python -m export.caption IMG --model exported/ --sample-method top-p --top-p 0.9 --sample-n 3 --seed 0
    python -m export.caption IMG --model exported/ --beam-size 6 --beam-groups 3 --block-trigrams --bad-endings

Output, one line per image on stdout: ``path<TAB>caption``, or with --json a JSON object per line
``{"file", "caption", "score"}`` (several captions per image, --sample-n or --beam-groups: one line per caption, or
a ``captions`` list in the JSON). The decoding controls are described in docs/decoding.md. A file that is not a readable image gets an ``error: ...`` line on stderr naming
it (``{"file", "error"}`` on stdout with --json); the others are still captioned and the exit code is 1.
Directories are expanded to the image files they hold (not recursive); URLs are refused (download first).
With --data, BLEU-1..4 and CIDEr-D against the dataset's reference captions are printed on stderr at the end (the fast
training metrics); --results-json FILE also writes the captions as COCO results for the paper-comparable metrics of
``python -m core.evaluate FILE --data DATA_DIR --split test``.
Progress (count, rate, time left) goes to stderr: a bar on a terminal, else a line every --progress-every images.

--model: an export directory (export/to_onnx.py). With --backend eager it may also be a checkpoint .pt; an
export directory works for eager too, through the model.safetensors the exporter writes there.
--save-dir DIR writes DIR/<name>.png (image with its caption) and DIR/<name>_attention.png (one attention map
per word).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from core import hardware
from core.cli import positive_int, run_main
from core.fileio import printable
from core.images import IMAGE_EXTENSIONS, release_image_memory_promptly
from core.logs import add_verbosity_args, get_logger, setup_logging
from export.runtime.load import add_model_args, check_decode_args, load_captioner, model_load_errors

log = get_logger("caption")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export.caption", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("inputs", nargs="*", help="image files or directories of images")
    add_model_args(p, beam_size=5)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default 16)")
    p.add_argument("--json", action="store_true", help="JSON lines {file, caption, score} instead of path<TAB>caption")
    p.add_argument("--save-dir", type=Path, default=None, help="write captioned images and attention figures here")
    p.add_argument("--file-list", type=Path, default=None, help="text file with one image path per line")
    p.add_argument("--data", type=Path, default=None, help="Flickr8k-layout dataset: caption images of --split")
    p.add_argument("--split", default="test", help="split of --data (default test)")
    p.add_argument("--limit", type=positive_int, default=None, help="caption at most this many images of --data")
    p.add_argument("--results-json", type=Path, default=None,
                   help="with --data: write the captions as COCO results [{image_id, caption}] for core.evaluate")
    p.add_argument("--progress-every", type=positive_int, default=100,
                   help="without a terminal: a progress line every N images (default 100)")
    add_verbosity_args(p)
    return p


# ------------------------------------------------------------------------------------------------- inputs
class InputError(ValueError):
    """The inputs cannot be used at all (a missing file list, an unknown split, no --save-dir): nothing is captioned."""


def expand_inputs(inputs: Sequence[str | Path], errors: list[str]) -> Iterator[Path]:
    """Files as given, directories as their image files (sorted); an empty directory or a URL is an error."""
    for item in inputs:
        if _URL.match(str(item)):
            errors.append(f"{item}: URLs are not supported; download the image and pass the file")
            continue
        path = Path(item)
        if path.is_dir():
            # Anything but a directory: a FIFO, device or broken link named .jpg gets its own error, not silence.
            files = sorted(p for p in path.iterdir() if not p.is_dir() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not p.name.startswith("."))
            if not files:
                errors.append(f"{path}: directory holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            yield from files
        else:
            yield path


def read_file_list(path: Path) -> list[str]:
    """Lines of a file list (blank lines and # comments skipped); relative paths are taken from its folder.

    Lines are file-system names, decoded like command-line arguments (bytes that are not UTF-8 kept as they are)."""
    base = path.parent
    out = []
    for raw in path.read_bytes().splitlines():
        line = os.fsdecode(raw.strip())
        if line and not line.startswith("#"):
            p = Path(line)
            out.append(line if _URL.match(line) or p.is_absolute() or p.exists() else str(base / p))
    return out


def dataset_inputs(data_dir: Path, split: str, limit: int | None) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """{image path: tokenized reference captions} for the first ``limit`` images of a split, {path: image name}."""
    from core.data import load_dataset
    from core.splits import SPLIT_NAMES
    from core.vocab import tokenize

    if split not in SPLIT_NAMES:
        raise InputError(f"{data_dir} has no split {split}; choose from {', '.join(SPLIT_NAMES)}")
    data = load_dataset(data_dir)
    names = data.splits[split][:limit]
    return ({str(data.image_path(n)): [tokenize(c) for c in data.captions[n]] for n in names},
            {str(data.image_path(n)): n for n in names})


@dataclass
class Inputs:
    paths: list[Path] = field(default_factory=list)
    references: dict[str, list[list[str]]] = field(default_factory=dict)
    image_ids: dict[str, str] = field(default_factory=dict)  # --data images: path -> name in the dataset
    errors: list[str] = field(default_factory=list)  # inputs that are not captioned, each counted as failed


def gather_inputs(args: argparse.Namespace) -> Inputs:
    from core.data import DataFormatError, DatasetNotFoundError

    found = Inputs()
    items = list(args.inputs)
    try:
        if args.file_list:
            items += read_file_list(args.file_list)
        if args.data:
            found.references, found.image_ids = dataset_inputs(args.data, args.split, args.limit)
    except OSError as e:
        raise InputError(f"{e.filename}: {e.strerror or e}") from e
    except (DataFormatError, DatasetNotFoundError) as e:
        raise InputError(str(e)) from e
    found.paths = list(expand_inputs(items, found.errors)) + [Path(p) for p in found.references]
    if not found.paths and not found.errors:
        raise InputError("nothing to caption: give image files or directories, --file-list or --data")
    try:
        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create --save-dir {args.save_dir}: {e.strerror or e}") from e
    return found


def path_reason(backend_name: str, device: str) -> str:
    """Why the model runs where it does, in the words of core.hardware."""
    hw = hardware.detect(ort=backend_name == "ort")
    if backend_name == "ort":
        return hardware.choose_caption_path(hw, device).reason
    if device != "auto":
        return f"--device {device}"
    return "a CUDA GPU is visible" if hw.cuda else f"no CUDA GPU ({hardware.summary(hw)})"


# ----------------------------------------------------------------------------------------------- progress
def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Images done out of ``total`` on stderr: a tqdm bar on a terminal, else one log line every ``every``."""

    def __init__(self, total: int, every: int, stream=None):
        from tqdm import tqdm

        stream = stream or sys.stderr
        self.total, self.every, self.done = total, every, 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=total, unit="img", file=stream, disable=not stream.isatty(), leave=False)

    def update(self) -> None:
        self.done += 1
        self.bar.update(1)
        if self.bar.disable and (self.done % self.every == 0) and self.done < self.total:
            log.info("%s", self.line())

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{self.done}/{self.total} images, {rate:.1f} images/s, {_duration(left)} left"

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------------------------ the run
FIGURE_STEM_BYTES = 200  # + "_attention.png" + a counter stays under the 255-byte name limit of file systems
FIGURE_SIDE = 1024  # figures show the image at most this big (a 9400 px photo would cost GBs in matplotlib)


def figure_names(path: str, used: set[str]) -> tuple[str, str]:
    """``(<stem>.png, <stem>_attention.png)``, neither written before in this run (a.jpg and a_attention.png
    side by side get a.png, a_attention.png, a_attention_2.png, ...), each name under 255 bytes."""
    stem = os.fsdecode(os.fsencode(Path(path).stem or "image")[:FIGURE_STEM_BYTES])
    name, i = stem, 2
    while f"{name}.png" in used or f"{name}_attention.png" in used:
        name, i = f"{stem}_{i}", i + 1
    used.update((f"{name}.png", f"{name}_attention.png"))
    return f"{name}.png", f"{name}_attention.png"


def save_figures(r, save_dir: Path, used: set[str]) -> None:
    """DIR/<name>.png with its caption and DIR/<name>_attention.png; OSError, ValueError or core.fileio.WriteError
    (a RuntimeError) when they cannot be written."""
    from core.images import load_image
    from core.viz import save_attention_figure, save_captioned_image

    captioned, attention = figure_names(r.path, used)
    image = load_image(r.path)
    image.thumbnail((FIGURE_SIDE, FIGURE_SIDE))
    save_captioned_image(image, r.caption, save_dir / captioned)
    if r.words:
        grid = int(round(math.sqrt(r.alphas.shape[1])))
        save_attention_figure(image, r.words, r.alphas, grid=grid, path=save_dir / attention)


@dataclass
class Tally:
    captioned: int = 0
    failed: int = 0
    hyps: list[list[str]] = field(default_factory=list)  # captions of the --data images, for the metrics
    refs: list[list[list[str]]] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)  # COCO results of the --data images


def caption_all(args: argparse.Namespace, captioner, inputs: Inputs) -> Tally:
    """Caption every path, printing one line each (stdout) and each error (stderr) as it comes."""
    tally, used = Tally(failed=len(inputs.errors)), set()
    progress = Progress(len(inputs.paths), args.progress_every)
    try:
        for r in captioner.caption_paths(inputs.paths, args.batch_size, keep_alphas=args.save_dir is not None):
            progress.update()
            if not r.ok:
                tally.failed += 1
                print(f"error: {printable(r.error)}", file=sys.stderr)
                if args.json:
                    print(json.dumps(r.to_json()), flush=True)
                continue
            tally.captioned += 1
            # printable: a name holding a tab and a newline must not print a second, fake result line
            lines = [json.dumps(r.to_json())] if args.json else [f"{printable(r.path)}\t{printable(c)}" for c in r.captions]
            print("\n".join(lines), flush=True)  # (sample_n / beam_groups > 1: one line per caption)
            if r.path in inputs.references:
                tally.hyps.append(r.words)
                tally.refs.append(inputs.references[r.path])
                tally.results.append({"image_id": inputs.image_ids[r.path], "caption": r.caption})
            if args.save_dir:
                try:
                    save_figures(r, args.save_dir, used)
                except (OSError, ValueError, RuntimeError) as e:  # name too long, disk full, file-size limit
                    tally.failed += 1
                    print(f"error: {printable(f'{r.path}: could not write figures to {args.save_dir}: {e}')}",
                          file=sys.stderr)
    finally:
        progress.close()
    return tally


def summary(args: argparse.Namespace, tally: Tally, seconds: float) -> str:
    done = tally.captioned + tally.failed
    line = f"{tally.captioned} captioned, {tally.failed} failed in {seconds:.2f} s ({done / max(seconds, 1e-9):.1f} images/s)"
    if tally.hyps:
        from core.metrics import caption_metrics

        m = caption_metrics(tally.hyps, tally.refs)
        line += (f"; vs {args.data} references ({len(tally.hyps)} images): BLEU-1 {m['bleu1']:.3f} "
                 f"BLEU-4 {m['bleu4']:.3f} CIDEr-D {m['cider']:.3f}")
    if args.save_dir:
        line += f"; figures in {args.save_dir}"
    return line


def _safe_streams() -> None:
    """Output never fails on a name the locale cannot encode (LC_ALL=C, PYTHONIOENCODING=ascii): escaped instead;
    a file-size limit (RLIMIT_FSIZE) fails that write with EFBIG, one file's error, instead of killing the run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(argv: Sequence[str] | None = None) -> int:
    _safe_streams()
    args = build_parser().parse_args(argv)
    setup_logging("caption", args.verbose - args.quiet)
    release_image_memory_promptly()  # loader threads: freed images leave the process (bounded peak memory)
    try:
        if args.results_json and not args.data:
            raise InputError("--results-json needs --data DIR (the image ids are the dataset's names)")
        check_decode_args(args)
        inputs = gather_inputs(args)
    except (InputError, ValueError) as e:
        print(f"error: {printable(str(e))}", file=sys.stderr)
        return 2
    try:
        captioner = load_captioner(args)
    except model_load_errors() as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    log.info("%s, beam %d (%s search), max_len %d; %s; precision %s", captioner.backend.describe(), args.beam_size,
             args.search, captioner.max_len, path_reason(args.backend, args.device), captioner.backend.precision)
    for e in inputs.errors:
        print(f"error: {printable(e)}", file=sys.stderr)
    t0 = time.perf_counter()
    tally = caption_all(args, captioner, inputs)
    log.info("%s", summary(args, tally, time.perf_counter() - t0))
    if args.results_json:
        from core.fileio import atomic_write_text

        atomic_write_text(args.results_json, json.dumps(tally.results, indent=0) + "\n")
        log.info("results of %d images in %s: python -m core.evaluate %s --data %s --split %s", len(tally.results),
                 args.results_json, args.results_json, args.data, args.split)
    return 1 if tally.failed else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
