"""Scan a dataset once for everything that would break or silently spoil training.

    python -m core.data check DATA_DIR [--skip-list PATH] [--workers N] [--dataset auto|flickr8k|flickr30k|coco]
    python -m core.datacheck DATA_DIR ...          (same command, without going through core.data)

Every image in ``Images/`` and every line of ``Flickr8k.token.txt`` is checked (the Flickr8k layout). The
Karpathy-file layouts (``dataset_flickr30k.json`` + ``flickr30k-images/``, ``dataset_coco.json`` + ``train2014/``
and ``val2014/``, or Flickr8k's images with ``--karpathy-json``; see core.layouts) are checked the same way: every
image of the folders that hold captioned images, and every caption of the file, whose problems are named
``FILE: kind: sentence J: IMAGE ...`` (the file is JSON: there are no line numbers; one it cannot parse is exit 2
with the field named). Images go through the
training loader's own steps (``core.images``: header checks, full decode with ``LOAD_TRUNCATED_IMAGES`` off,
EXIF, RGB) in a thread pool, so a truncated file cannot pass as half an image. Threads decode together only
while their images' pixels add up to at most the pixel limit, so memory stays near that of one image at the
limit (under 1 GB at the default), whatever ``--workers`` says. Each problem is printed as
``path[:line]: kind: message``, then counts per kind. The images to leave out are written to a skip list
(``core.skiplist``; default ``DATA_DIR/skip_list.json``) that training reads on every rank. Exit status:
0 clean, 1 problems found (skip list still written), 2 unusable input (no such directory, no ``Images/``,
no or empty caption file, skip list not writable).

Rules (each problem ``kind``, and what is accepted):

Image files (path ``Images/NAME``); the image is put on the skip list:
  empty-file          zero bytes
  not-an-image        Pillow cannot identify the content (e.g. a text file named .jpg)
  truncated           the data ends before the image does (decoding fails near the end)
  corrupt             any other decode error, whatever exception the decoder raised
  unreadable          the file cannot be read (permissions, I/O error)
  decompression-bomb  width x height > ``max_pixels`` (default ``core.images.MAX_PIXELS``), read from the
                      header before anything is decoded; also whatever Pillow itself refuses as a bomb
  too-small           shorter side < ``min_side`` (default 8 px; a 1xN strip is useless at 14x14 features)
  extreme-aspect      longer side / shorter side > ``max_aspect`` (default 25; the model squashes every image
                      to a square, so a 1:40 panorama is mostly smear)
  unsupported-format  by content, not one of ``core.images.ACCEPTED_FORMATS`` (JPEG, PNG, WebP, BMP, TIFF);
                      e.g. GIF, ICO, PCX, TGA, PPM, whatever the extension says
  unsupported-mode    ``core.images.to_rgb`` cannot convert the decoded mode. Every mode it can convert is
                      accepted: L, LA, La, P, PA, RGBA, CMYK, YCbCr, LAB, I;16, I, F, 1, ...
  outside-root        a symbolic link that leads out of the image folder: never opened (training refuses the
                      name whatever the skip list says: ``core.captions.resolve_inside``)
  no-captions         an image file with no caption line
Caption file (path ``Flickr8k.token.txt`` and the line number):
  not-utf8            the line is not valid UTF-8
  bad-caption-line    the line is not ``IMAGE#N<TAB>caption`` (same rule as ``core.captions.parse_token_file``)
  duplicate-caption   ``IMAGE#N`` seen before, or the same caption (case and spacing ignored) for the same image
  empty-caption       the caption has no word once tokenized (e.g. ``...``); this and duplicate-caption are the
                      lines training skips by itself (``core.captions.CaptionFilter``, counted in its log)
  missing-image       captions name an image that is not a file in ``Images/`` (reported once, at its first
                      line; the name goes on the skip list)

Ignored (counted in the summary, not problems): sub-directories and hidden files in ``Images/``, and files
whose extension is not in ``core.images.IMAGE_EXTENSIONS``, unless a caption names them. The extension does
not have to match the content (a PNG named .jpg is fine: both loaders sniff the content).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

import core.images
from core.captions import (IMAGES_DIR, TOKEN_FILE, CaptionFilter, DataFormatError, OutsideRootError,
                           not_utf8_message, parse_caption_line, read_lines, resolve_inside)
from core.cli import run_main
from core.fileio import WriteError, atomic_write_text
from core.images import IMAGE_EXTENSIONS, ImageLoadError, PixelBudget, decode_rgb, open_image
from core.layouts import (KARPATHY_FILES, DatasetNotFoundError, Flickr8kReader, add_dataset_args, create_reader,
                          detect)
from core.skiplist import (SKIP_LIST_FORMAT, SKIP_LIST_NAME, SKIP_LIST_VERSION, dataset_listing_hash,
                            is_regular_entry)

MIN_SIDE = 8
MAX_ASPECT = 25.0

IMAGE_KINDS = ("empty-file", "not-an-image", "truncated", "corrupt", "unreadable", "decompression-bomb",
               "too-small", "extreme-aspect", "unsupported-format", "unsupported-mode", "outside-root", "no-captions")
LINE_KINDS = ("not-utf8", "bad-caption-line", "duplicate-caption", "empty-caption", "missing-image")


class DataCheckError(ValueError):
    """The dataset cannot be checked at all (missing directory or caption file): exit status 2."""


@dataclass(frozen=True)
class Problem:
    """One finding. ``path`` is relative to the dataset root (``Images/x.jpg``, ``Flickr8k.token.txt``)."""

    path: str
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class CheckReport:
    root: Path
    problems: list[Problem]
    skip: list[str]  # sorted image names to leave out of training
    skip_reasons: dict[str, str]  # name -> "kind: message"
    bad_lines: list[int]  # caption-file lines that do not parse (not-utf8, bad-caption-line)
    listing_hash: str
    num_images: int = 0  # image files checked
    num_caption_lines: int = 0  # non-blank lines of the caption file
    num_ignored: int = 0  # entries of the image folders not checked (sub-directories, hidden files, other extensions)
    image_folders: str = IMAGES_DIR + "/"  # where the images are, for the summary

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        counts = self.counts()
        bad = len({p.path for p in self.problems if p.kind in IMAGE_KINDS})
        head = (f"checked {self.num_images} images ({self.num_images - bad} ok), {self.num_caption_lines} caption "
                f"lines, ignored {self.num_ignored} other entries of {self.image_folders}")
        if not self.problems:
            return head + "\nno problems found"
        kinds = ", ".join(f"{k} {counts[k]}" for k in (*IMAGE_KINDS, *LINE_KINDS) if counts[k])
        return (f"{head}\n{len(self.problems)} problems: {kinds}\n"
                f"{len(self.skip)} images to skip, {len(self.bad_lines)} caption lines that do not parse")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Limits:
    min_side: int
    max_aspect: float
    max_pixels: int


def check_image(path: Path, limits: _Limits, budget: PixelBudget | None = None) -> tuple[str, str] | None:
    """``(kind, message)`` for the first problem of one image file, or None when it loads for training.

    The steps of ``core.images.load_image`` (header checks before anything is decoded, then the full decode,
    EXIF orientation and RGB conversion), with the size rules of the check between the two.
    """
    try:
        with open_image(path, limits.max_pixels) as im:
            w, h = im.size
            if min(w, h) < limits.min_side:
                return "too-small", f"{w}x{h}: shorter side under {limits.min_side} px"
            if max(w, h) > limits.max_aspect * min(w, h):
                return "extreme-aspect", f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} over {limits.max_aspect:g}"
            with budget.take(w * h) if budget else nullcontext():
                decode_rgb(im, path)
    except ImageLoadError as e:
        return e.kind, e.detail
    return None


def _image_files(images_dir: Path, folder: str = "") -> tuple[set[str], set[str], int]:
    """(files that count as dataset images, all regular files, number of entries not counted) of one image
    folder, ``images_dir/folder``, named as the captions name them (``folder/NAME``, or ``NAME`` at the top)."""
    images: set[str] = set()
    regular: set[str] = set()
    ignored = 0
    prefix = f"{folder}/" if folder else ""
    for e in os.scandir(images_dir / folder):
        is_file = is_regular_entry(e)
        if is_file:
            regular.add(prefix + e.name)
        if e.name.startswith(".") or not is_file or os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
            ignored += 1
        else:
            images.add(prefix + e.name)
    return images, regular, ignored


# --------------------------------------------------------------------------------------------
# Caption file
# --------------------------------------------------------------------------------------------
@dataclass
class _Captions:
    file: str = TOKEN_FILE  # the caption file, relative to the dataset root
    first_line: dict[str, int | None] = field(default_factory=dict)  # image name -> first line naming it
    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


def _scan_captions(path: Path) -> _Captions:
    out = _Captions()
    rel = path.name
    rules = CaptionFilter()  # the lines training skips, by the same rule
    for lineno, line, raw in read_lines(path):
        if isinstance(line, UnicodeDecodeError):
            out.lines += 1
            out.bad_lines.append(lineno)
            out.problems.append(Problem(rel, lineno, "not-utf8", not_utf8_message(raw, line)))
            continue
        if not line.strip():
            continue
        out.lines += 1
        try:
            name, n, caption = parse_caption_line(line)
        except DataFormatError as e:
            out.bad_lines.append(lineno)
            out.problems.append(Problem(rel, lineno, "bad-caption-line", str(e)))
            continue
        out.first_line.setdefault(name, lineno)
        problem = rules.problem(lineno, name, n, caption)
        if problem:
            out.problems.append(Problem(rel, lineno, *problem))
    return out


def _scan_karpathy(root: Path, dataset: str, karpathy_json: Path | None) -> tuple[_Captions, Path]:
    """The captions of a Karpathy-file layout (core.layouts reads and validates the file) and its image folder."""
    try:
        layout = create_reader(dataset, root, karpathy_json).read()
    except (DatasetNotFoundError, DataFormatError) as e:
        raise DataCheckError(str(e)) from e
    source = Path(karpathy_json) if karpathy_json is not None else root / KARPATHY_FILES[layout.dataset]
    out = _Captions(file=os.path.relpath(source, root))
    rules = CaptionFilter(unit="sentence")  # training's rule; a JSON file has sentences, not lines
    for name, captions in layout.captions.items():
        out.first_line[name] = None
        for j, caption in enumerate(captions):
            out.lines += 1
            problem = rules.problem(j, name, str(j), caption)
            if problem:
                out.problems.append(Problem(out.file, None, problem[0], f"sentence {j}: {problem[1]}"))
    return out, layout.images_dir


def _token_layout(root: Path, dataset: str, karpathy_json: Path | None) -> bool:
    """Whether ``root`` is read as Images/ + Flickr8k.token.txt (else: a Karpathy file's layout), as training reads it."""
    if dataset == "auto":
        try:
            dataset = detect(root, karpathy_json)
        except DatasetNotFoundError:
            return True  # nothing recognizable: the Flickr8k checks name what is missing
    return dataset == "flickr8k" and Flickr8kReader(root, karpathy_json).reads_token_file()


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------
def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) * 2))  # decode threads release the GIL; I/O overlaps


def _check_images(images_dir: Path, names: list[str], limits: _Limits,
                  workers: int) -> list[tuple[str, str] | None]:
    """:func:`check_image` of each name, in a thread pool whose decodes share one pixel budget."""
    budget = PixelBudget(limits.max_pixels)
    truncated_before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whoever set this
    try:
        with warnings.catch_warnings():  # the size limit is checked explicitly; Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(lambda n: check_image(images_dir / n, limits, budget), names))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_before


def check_dataset(root: str | os.PathLike[str], workers: int | None = None, *, min_side: int = MIN_SIDE,
                  max_aspect: float = MAX_ASPECT, max_pixels: int | None = None, dataset: str = "auto",
                  karpathy_json: str | os.PathLike[str] | None = None) -> CheckReport:
    """Check every image and caption of ``root`` once; see the module docstring for the rules.

    ``dataset``/``karpathy_json`` choose the layout as training does (core.layouts; auto: from the files present).
    ``max_pixels`` None means ``core.images.MAX_PIXELS`` at call time. Raises :class:`DataCheckError`
    for unusable input.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataCheckError(f"dataset directory {root} does not exist")
    limits = _Limits(min_side, max_aspect, core.images.MAX_PIXELS if max_pixels is None else max_pixels)
    caps, images_dir = _read_captions(root, dataset, Path(karpathy_json) if karpathy_json is not None else None)
    listing = _list_images(root, images_dir, caps)
    problems, skip = list(caps.problems), {}
    _check_missing(caps, listing, problems, skip)
    for name in listing.escaping:  # a link out of the folder is named, never opened
        message = "a symbolic link that leads out of the image folder (never opened)"
        problems.append(Problem(listing.shown(name), None, "outside-root", message))
        skip.setdefault(name, []).append(f"outside-root: {message}")
    names = [n for n in listing.names if n not in listing.escaping]
    results = _check_images(images_dir, names, limits, workers or _default_workers())
    for name, result in zip(names, results):
        rel = listing.shown(name)
        if result is not None:
            kind, message = result
            problems.append(Problem(rel, None, kind, message))
            skip.setdefault(name, []).append(f"{kind}: {message}")
        if name not in caps.first_line:
            problems.append(Problem(rel, None, "no-captions", f"no caption of {caps.file} names {name}"))
            skip.setdefault(name, []).append("no-captions")
    problems.sort(key=lambda p: (p.path, p.line or 0, p.kind))
    listed = ", ".join(listing.shown(f) + "/" for f in listing.folders) or f"{IMAGES_DIR}/"
    return CheckReport(root=root, problems=problems, skip=sorted(skip),
                       skip_reasons={n: "; ".join(skip[n]) for n in sorted(skip)},
                       bad_lines=sorted(caps.bad_lines), listing_hash=dataset_listing_hash(root),
                       num_images=len(listing.names), num_caption_lines=caps.lines, num_ignored=listing.ignored,
                       image_folders=listed)


def _read_captions(root: Path, dataset: str, kpath: Path | None):
    """(caption scan, image folder) of the layout training would read (the token file or a Karpathy file)."""
    if not _token_layout(root, dataset, kpath):
        return _scan_karpathy(root, dataset, kpath)
    images_dir, token = root / IMAGES_DIR, root / TOKEN_FILE
    if not images_dir.is_dir():
        raise DataCheckError(f"no {IMAGES_DIR}/ folder in {root}")
    if not token.is_file():
        raise DataCheckError(f"no caption file {token}")
    try:
        caps = _scan_captions(token)
    except OSError as e:
        raise DataCheckError(f"cannot read {token}: {e.strerror or e}") from e
    if not caps.first_line and not caps.problems:
        raise DataCheckError(f"{token}: no captions found (empty file?)")
    return caps, images_dir


def _inside(folder: str) -> bool:
    """A folder named by a caption that stays inside the image folder ("../x.jpg" is a missing image)."""
    return not os.path.isabs(folder) and ".." not in Path(folder).parts


@dataclass
class _Listing:
    root: Path
    images_dir: Path
    folders: list[str]  # the folders listed, relative to the image folder
    names: list[str]  # the images to check
    on_disk: set[str]  # what core.data.load_dataset sees
    ignored: int
    escaping: set[str]  # names among ``names`` that are symbolic links out of the image folder

    def shown(self, name: str) -> str:  # a path in the messages, relative to the dataset root
        return os.path.relpath(self.images_dir / name, self.root)


def _list_images(root: Path, images_dir: Path, caps) -> _Listing:
    """The folders that hold captioned images, each listed once: the image folder itself (Images/,
    flickr30k-images/; not COCO's, which is the dataset root) and the sub-folders the captions name (train2014/,
    val2014/), never one outside the image folder."""
    named = {os.path.dirname(n) for n in caps.first_line} | ({""} if images_dir != root else set())
    folders = sorted(f for f in named if _inside(f))
    files, on_disk, ignored = set(), set(), 0
    for folder in folders:
        if (images_dir / folder).is_dir():
            f, d, i = _image_files(images_dir, folder)
            files, on_disk, ignored = files | f, on_disk | d, ignored + i
    # Referenced by a caption but hidden or with another extension: still an image of the dataset.
    for name in caps.first_line:
        if name in on_disk and name not in files:
            files.add(name)
            ignored -= 1
    return _Listing(root, images_dir, folders, sorted(files), on_disk, ignored,
                    {n for n in files if _escapes(images_dir, n, folders)})


def _escapes(images_dir: Path, name: str, folders: list[str]) -> bool:
    try:
        resolve_inside(images_dir, name, anchors=[f for f in folders if f])  # COCO's train2014/ may be a link
    except OutsideRootError:
        return True
    return False


def _check_missing(caps, listing: _Listing, problems: list[Problem], skip: dict[str, list[str]]) -> None:
    """A missing-image problem for each captioned name that is not a file of the listed folders."""
    for name, lineno in caps.first_line.items():
        if name not in listing.on_disk:
            folder = listing.shown(os.path.dirname(name) if _inside(os.path.dirname(name)) else "") + "/"
            problems.append(Problem(caps.file, lineno, "missing-image", f"{name!r} is not a file in {folder}"))
            skip.setdefault(name, []).append(f"missing-image: not a file in {folder}")


# --------------------------------------------------------------------------------------------
# Skip list
# --------------------------------------------------------------------------------------------
def skip_list_dict(report: CheckReport) -> dict[str, Any]:
    """The JSON content: deterministic (no times, no absolute paths), identical on every node."""
    return {
        "format": SKIP_LIST_FORMAT,
        "version": SKIP_LIST_VERSION,
        "listing_hash": report.listing_hash,
        "counts": dict(sorted(report.counts().items())),
        "skip": report.skip_reasons,
        "bad_caption_lines": report.bad_lines,
    }


def write_skip_list(report: CheckReport, path: str | os.PathLike[str]) -> Path:
    """Write the skip list atomically (``core.fileio.atomic_write``); ``WriteError`` names the path."""
    data = json.dumps(skip_list_dict(report), indent=1, ensure_ascii=False) + "\n"
    return atomic_write_text(path, data)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
_EPILOG = "Rules" + __doc__.split("Rules", 1)[1]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_args(p, splits=False)  # DATA_DIR, --dataset, --karpathy-json as in every command
    p.add_argument("--skip-list", type=Path, default=None,
                   help=f"where to write the skip list (default DATA_DIR/{SKIP_LIST_NAME})")
    p.add_argument("--no-skip-list", action="store_true", help="only report, write no skip list")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default 2 x CPUs, at most 8)")
    p.add_argument("--min-side", type=int, default=MIN_SIDE, help=f"smallest accepted side in px (default {MIN_SIDE})")
    p.add_argument("--max-aspect", type=float, default=MAX_ASPECT,
                   help=f"largest accepted long/short side ratio (default {MAX_ASPECT:g})")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"largest accepted width x height (default core.images.MAX_PIXELS = {core.images.MAX_PIXELS})")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")


def run_check(args: argparse.Namespace) -> int:
    """The ``check`` command on parsed arguments; returns the exit status."""
    try:
        report = check_dataset(args.data_dir, workers=args.workers, min_side=args.min_side,
                               max_aspect=args.max_aspect, max_pixels=args.max_pixels, dataset=args.dataset,
                               karpathy_json=args.karpathy_json)
    except DataCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for p in report.problems:
            print(f"{args.data_dir / p.path}{'' if p.line is None else f':{p.line}'}: {p.kind}: {p.message}")
    print(report.summary())
    if not args.no_skip_list:
        target = args.skip_list or args.data_dir / SKIP_LIST_NAME
        try:
            write_skip_list(report, target)
        except WriteError as e:
            print(f"error: cannot write the skip list: {e}", file=sys.stderr)
            return 2
        print(f"skip list: {target} ({len(report.skip)} images)")
    return 0 if report.ok else 1


def add_check_command(sub: Any) -> argparse.ArgumentParser:
    """Register ``check`` on an argparse subparsers object (``core.data.build_parser`` calls this)."""
    p = sub.add_parser("check", help="scan every image and caption line for problems, write a skip list",
                       description=__doc__.split("\n\n")[0], epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.datacheck", description=__doc__.split("\n\n")[0],
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run_check(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(run_main(main))
