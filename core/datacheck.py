"""Scan a Flickr8k-layout dataset once for everything that would break or silently spoil training.

    python -m core.data check DATA_DIR [--skip-list PATH] [--workers N]
    python -m core.datacheck DATA_DIR ...          (same command, without going through core.data)

Every image in ``Images/`` and every line of ``Flickr8k.token.txt`` is checked; images are fully decoded
(``img.load()``, ``LOAD_TRUNCATED_IMAGES`` off) in a thread pool, so a truncated file cannot pass as half an
image. Each problem is printed as ``path[:line]: kind: message``, then counts per kind. The images to leave
out are written to a skip list (JSON, default ``DATA_DIR/skip_list.json``) that training reads on every rank
(:func:`read_skip_list`, :func:`apply_skip_list`). Exit status: 0 clean, 1 problems found (skip list still
written), 2 unusable input (no such directory, no ``Images/``, no or empty caption file, skip list not writable).

Rules (each problem ``kind``, and what is accepted):

Image files (path ``Images/NAME``); the image is put on the skip list:
  empty-file          zero bytes
  not-an-image        Pillow cannot identify the content (e.g. a text file named .jpg)
  truncated           the data ends before the image does (decoding fails near the end)
  corrupt             any other decode error
  unreadable          the file cannot be read (permissions, I/O error)
  decompression-bomb  width x height > ``max_pixels`` (default ``PIL.Image.MAX_IMAGE_PIXELS``), read from the
                      header before anything is decoded; also whatever Pillow itself refuses as a bomb
  too-small           shorter side < ``min_side`` (default 8 px; a 1xN strip is useless at 14x14 features)
  extreme-aspect      longer side / shorter side > ``max_aspect`` (default 25; the model squashes every image
                      to a square, so a 1:40 panorama is mostly smear)
  unsupported-format  a format the DALI decoder does not read (anything but JPEG, PNG, BMP, TIFF, WebP,
                      PNM, JPEG 2000; e.g. GIF), so both loaders see the same images
  unsupported-mode    ``core.data.to_rgb`` cannot convert the decoded mode (e.g. a TIFF with premultiplied
                      grey+alpha, mode "La"). Every mode it can convert is accepted: L, LA, P, PA, RGBA, CMYK,
                      YCbCr, LAB, I;16, I, F, 1, ... (rules in ``core.data.to_rgb``)
  no-captions         an image file with no caption line
Caption file (path ``Flickr8k.token.txt`` and the line number):
  not-utf8            the line is not valid UTF-8
  bad-caption-line    the line is not ``IMAGE#N<TAB>caption`` (same rule as ``core.data.parse_token_file``)
  duplicate-caption   ``IMAGE#N`` seen before, or the same caption (case and spacing ignored) for the same image
  missing-image       captions name an image that is not a file in ``Images/`` (reported once, at its first
                      line; the name goes on the skip list)

Ignored (counted in the summary, not problems): sub-directories and hidden files in ``Images/``, and files
whose extension is not an image extension, unless a caption names them. The extension does not have to
match the content (a PNG named .jpg is fine: both loaders sniff the content).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from core.fileio import WriteError, atomic_write_text

TOKEN_FILE = "Flickr8k.token.txt"  # same names as core.data (not imported here: core.data pulls in torch)
IMAGES_DIR = "Images"
SKIP_LIST_NAME = "skip_list.json"
SKIP_LIST_FORMAT = "sat-captioning skip list"
SKIP_LIST_VERSION = 1

MIN_SIDE = 8
MAX_ASPECT = 25.0
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k"})
# Pillow format names that nvidia DALI's decoders.image also reads.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000"})

IMAGE_KINDS = ("empty-file", "not-an-image", "truncated", "corrupt", "unreadable", "decompression-bomb",
               "too-small", "extreme-aspect", "unsupported-format", "unsupported-mode", "no-captions")
LINE_KINDS = ("not-utf8", "bad-caption-line", "duplicate-caption", "missing-image")


class DataCheckError(ValueError):
    """The dataset cannot be checked at all (missing directory or caption file): exit status 2."""


class SkipListError(ValueError):
    """A skip list is unreadable, of another format, or was made for another dataset listing."""


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
    num_ignored: int = 0  # entries of Images/ not checked (sub-directories, hidden files, other extensions)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        counts = self.counts()
        bad = len({p.path for p in self.problems if p.path.startswith(IMAGES_DIR + "/")})
        head = (f"checked {self.num_images} images ({self.num_images - bad} ok), {self.num_caption_lines} caption "
                f"lines, ignored {self.num_ignored} other entries of {IMAGES_DIR}/")
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
    max_pixels: int | None


def _core_data():
    from core import data  # imports torch: only when images are actually checked

    return data


def _classify_decode_error(e: BaseException) -> str:
    text = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in text or "premature end" in text:
        return "truncated"
    return "corrupt"


def check_image(path: Path, limits: _Limits) -> tuple[str, str] | None:
    """``(kind, message)`` for the first problem of one image file, or None when it loads for training.

    Mirrors ``core.data.load_image`` (open, full decode, EXIF orientation, ``to_rgb``), after checking
    the header's size, format and the file's size, so no bomb is ever decoded.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        return "unreadable", f"cannot stat: {e.strerror or e}"
    if size == 0:
        return "empty-file", "zero bytes"
    try:
        im = Image.open(path)  # reads the header only
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(16)
        return "not-an-image", f"not an image format Pillow knows ({size} bytes, starts with {head!r})"
    except Image.DecompressionBombError as e:
        return "decompression-bomb", f"refused by Pillow before decoding: {e}"
    except PermissionError as e:
        return "unreadable", f"cannot open: {e.strerror or e}"
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # broken header
        return _classify_decode_error(e), f"cannot read the header ({type(e).__name__}: {e})"
    with im:
        w, h = im.size
        fmt = im.format or "?"
        if limits.max_pixels is not None and w * h > limits.max_pixels:
            return "decompression-bomb", (f"{w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels} "
                                          "(PIL.Image.MAX_IMAGE_PIXELS); not decoded")
        if min(w, h) < limits.min_side:
            return "too-small", f"{w}x{h}: shorter side under {limits.min_side} px"
        if max(w, h) > limits.max_aspect * min(w, h):
            return "extreme-aspect", f"{w}x{h}: aspect ratio {max(w, h) / min(w, h):.1f} over {limits.max_aspect:g}"
        if fmt not in SUPPORTED_FORMATS:
            return "unsupported-format", (f"{fmt} is not read by the DALI loader "
                                          f"(supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
        try:
            im.load()  # the full decode, as core.data.load_image does
        except Image.DecompressionBombError as e:
            return "decompression-bomb", str(e)
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
            return _classify_decode_error(e), f"{fmt} {w}x{h} does not decode ({type(e).__name__}: {e})"
        try:
            if im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                im = ImageOps.exif_transpose(im)
        except Exception as e:  # noqa: BLE001 - any EXIF failure is a corrupt file
            return "corrupt", f"bad EXIF data ({type(e).__name__}: {e})"
        try:
            _core_data().to_rgb(im)
        except (ValueError, OSError, TypeError) as e:
            return "unsupported-mode", f"mode {im.mode!r} cannot be converted to RGB ({e})"
    return None


def _image_files(images_dir: Path) -> tuple[set[str], set[str], int]:
    """(files that count as dataset images, all regular files, number of entries not counted) of Images/."""
    images: set[str] = set()
    regular: set[str] = set()
    ignored = 0
    for e in os.scandir(images_dir):
        if e.is_file():
            regular.add(e.name)
        if e.name.startswith(".") or not e.is_file() or os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
            ignored += 1
        else:
            images.add(e.name)
    return images, regular, ignored


# --------------------------------------------------------------------------------------------
# Caption file
# --------------------------------------------------------------------------------------------
@dataclass
class _Captions:
    first_line: dict[str, int] = field(default_factory=dict)  # image name -> first line naming it
    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)


def _scan_captions(path: Path) -> _Captions:
    out = _Captions()
    rel = path.name
    keys: dict[tuple[str, str], int] = {}
    texts: dict[tuple[str, str], int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                out.lines += 1
                out.bad_lines.append(lineno)
                out.problems.append(Problem(rel, lineno, "not-utf8",
                                            f"byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8"))
                continue
            if not line.strip():
                continue
            out.lines += 1
            try:
                name, n, caption = _core_data().parse_caption_line(line)
            except ValueError as e:
                out.bad_lines.append(lineno)
                out.problems.append(Problem(rel, lineno, "bad-caption-line", str(e)))
                continue
            out.first_line.setdefault(name, lineno)
            text = " ".join(caption.lower().split())
            if (name, n) in keys:
                out.problems.append(Problem(rel, lineno, "duplicate-caption",
                                            f"{name}#{n} already on line {keys[name, n]}"))
            elif (name, text) in texts:
                out.problems.append(Problem(rel, lineno, "duplicate-caption",
                                            f"same caption for {name} as line {texts[name, text]}"))
            keys.setdefault((name, n), lineno)
            texts.setdefault((name, text), lineno)
    return out


# --------------------------------------------------------------------------------------------
# The whole dataset
# --------------------------------------------------------------------------------------------
def dataset_listing_hash(root: str | os.PathLike[str]) -> str:
    """sha256 over the caption file's bytes and the (name, size) of every non-hidden file in Images/.

    Sizes, not times or contents: a copy of the dataset on another node has the same hash, and hashing
    8,000 images costs one directory listing. Hidden files (.DS_Store, ._x.jpg) that copy tools add or
    drop do not count.
    """
    root = Path(root)
    h = hashlib.sha256()
    token = root / TOKEN_FILE
    if token.is_file():
        th = hashlib.sha256()
        with open(token, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                th.update(chunk)
        h.update(f"{TOKEN_FILE}\t{th.hexdigest()}\n".encode())
    images_dir = root / IMAGES_DIR
    if images_dir.is_dir():
        entries = sorted((e.name, e.stat().st_size) for e in os.scandir(images_dir)
                         if e.is_file() and not e.name.startswith("."))
        for name, size in entries:
            h.update(f"{IMAGES_DIR}/{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1) * 2))  # decode threads release the GIL; I/O overlaps


def check_dataset(root: str | os.PathLike[str], workers: int | None = None, *, min_side: int = MIN_SIDE,
                  max_aspect: float = MAX_ASPECT, max_pixels: int | None = -1) -> CheckReport:
    """Check every image and caption line of ``root`` once; see the module docstring for the rules.

    ``max_pixels=-1`` (default) means ``PIL.Image.MAX_IMAGE_PIXELS`` at call time; None disables the limit
    (Pillow's own bomb check still applies). Raises :class:`DataCheckError` for unusable input.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataCheckError(f"dataset directory {root} does not exist")
    images_dir, token = root / IMAGES_DIR, root / TOKEN_FILE
    if not images_dir.is_dir():
        raise DataCheckError(f"no {IMAGES_DIR}/ folder in {root}")
    if not token.is_file():
        raise DataCheckError(f"no caption file {token}")
    if max_pixels == -1:
        max_pixels = Image.MAX_IMAGE_PIXELS
    limits = _Limits(min_side, max_aspect, max_pixels)

    try:
        caps = _scan_captions(token)
    except OSError as e:
        raise DataCheckError(f"cannot read {token}: {e.strerror or e}") from e
    if not caps.first_line and not caps.problems:
        raise DataCheckError(f"{token}: no captions found (empty file?)")
    files, on_disk, ignored = _image_files(images_dir)  # on_disk: what core.data.load_flickr8k sees
    # Referenced by a caption but hidden or with another extension: still an image of the dataset.
    for name in caps.first_line:
        if name in on_disk and name not in files:
            files.add(name)
            ignored -= 1
    names = sorted(files)

    problems = list(caps.problems)
    skip: dict[str, list[str]] = {}
    for name, lineno in caps.first_line.items():
        if name not in on_disk:
            problems.append(Problem(TOKEN_FILE, lineno, "missing-image",
                                    f"{name!r} is not a file in {IMAGES_DIR}/"))
            skip.setdefault(name, []).append(f"missing-image: not a file in {IMAGES_DIR}/")

    workers = workers or _default_workers()
    _core_data()  # import once here, not concurrently in the pool
    truncated_before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whoever set this
    try:
        with warnings.catch_warnings():  # the size limit is checked explicitly; Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(lambda n: check_image(images_dir / n, limits), names))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_before
    for name, result in zip(names, results):
        rel = f"{IMAGES_DIR}/{name}"
        if result is not None:
            kind, message = result
            problems.append(Problem(rel, None, kind, message))
            skip.setdefault(name, []).append(f"{kind}: {message}")
        if name not in caps.first_line:
            problems.append(Problem(rel, None, "no-captions", f"no line of {TOKEN_FILE} names {name}"))
            skip.setdefault(name, []).append("no-captions")

    problems.sort(key=lambda p: (p.path, p.line or 0, p.kind))
    return CheckReport(root=root, problems=problems, skip=sorted(skip),
                       skip_reasons={n: "; ".join(skip[n]) for n in sorted(skip)},
                       bad_lines=sorted(caps.bad_lines), listing_hash=dataset_listing_hash(root),
                       num_images=len(names), num_caption_lines=caps.lines, num_ignored=ignored)


# --------------------------------------------------------------------------------------------
# Skip list
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipList:
    skip: dict[str, str]  # image name -> reason
    bad_lines: list[int]  # caption-file line numbers that do not parse
    listing_hash: str

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.skip)


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


def read_skip_list(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> SkipList:
    """Read a skip list; with ``root``, refuse it when the dataset listing changed since the check."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SkipListError(f"skip list {path} not found (make it with `python -m core.data check DATA_DIR`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipListError(f"{path} is not a readable skip list: {e}") from e
    if not isinstance(data, dict) or data.get("format") != SKIP_LIST_FORMAT:
        raise SkipListError(f"{path} is not a skip list (no 'format': {SKIP_LIST_FORMAT!r})")
    if data.get("version") != SKIP_LIST_VERSION:
        raise SkipListError(f"{path} is skip list version {data.get('version')!r}; "
                            f"this version reads {SKIP_LIST_VERSION}")
    skip, lines, digest = data.get("skip"), data.get("bad_caption_lines", []), data.get("listing_hash")
    if not isinstance(skip, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in skip.items()) \
            or not isinstance(lines, list) or not all(isinstance(n, int) for n in lines) \
            or not isinstance(digest, str):
        raise SkipListError(f"{path}: malformed skip list (expected 'skip' {{name: reason}}, "
                            "'bad_caption_lines' [int], 'listing_hash' str)")
    if root is not None:
        now = dataset_listing_hash(root)
        if now != digest:
            raise SkipListError(f"{path} was made for another version of the dataset {root} (listing hash "
                                f"{digest[:19]}... vs {now[:19]}... now): run `python -m core.data check {root}` again")
    return SkipList(dict(sorted(skip.items())), sorted(lines), digest)


def apply_skip_list(data: Any, skip: SkipList | Iterable[str]) -> Any:
    """A ``core.data.Flickr8k`` without the skipped images, splits otherwise unchanged.

    Filtering after splitting keeps every other image in its split, and the result depends only on the
    dataset and the skip list, so every rank computes the same.
    """
    from core.data import SPLIT_NAMES, Splits

    names = skip.names if isinstance(skip, SkipList) else frozenset(skip)
    captions = {n: c for n, c in data.captions.items() if n not in names}
    splits = Splits(*([n for n in data.splits[s] if n not in names] for s in SPLIT_NAMES))
    return replace(data, captions=captions, splits=splits)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
_EPILOG = "Rules" + __doc__.split("Rules", 1)[1]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="dataset root (Images/ + Flickr8k.token.txt)")
    p.add_argument("--skip-list", type=Path, default=None,
                   help=f"where to write the skip list (default DATA_DIR/{SKIP_LIST_NAME})")
    p.add_argument("--no-skip-list", action="store_true", help="only report, write no skip list")
    p.add_argument("--workers", type=int, default=None, help="decode threads (default 2 x CPUs, at most 8)")
    p.add_argument("--min-side", type=int, default=MIN_SIDE, help=f"smallest accepted side in px (default {MIN_SIDE})")
    p.add_argument("--max-aspect", type=float, default=MAX_ASPECT,
                   help=f"largest accepted long/short side ratio (default {MAX_ASPECT:g})")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"largest accepted width x height (default PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the summary")


def run_check(args: argparse.Namespace) -> int:
    """The ``check`` command on parsed arguments; returns the exit status."""
    try:
        report = check_dataset(args.data_dir, workers=args.workers, min_side=args.min_side,
                               max_aspect=args.max_aspect,
                               max_pixels=-1 if args.max_pixels is None else args.max_pixels)
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


add_check_subcommand = add_check_command  # the name used in the issue


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.datacheck", description=__doc__.split("\n\n")[0],
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    return run_check(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
