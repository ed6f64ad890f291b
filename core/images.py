"""The one image loader of every path (dataset check, training, captioning) and the image transform.

A file becomes an RGB image in three steps, each of which either passes or raises :class:`ImageLoadError`
naming the file, with a ``kind`` (the dataset check's problem kinds):

1. the file: a regular, non-empty, readable file (a FIFO or device is never opened, so it cannot hang);
2. the header (``Image.open`` reads only that): the format, judged by content whatever the extension says,
   must be one of ``ACCEPTED_FORMATS`` (no other reader of Pillow's ever runs; others are named by their
   signature in the error); width x height must not exceed the pixel limit (``MAX_PIXELS`` unless a
   ``max_pixels`` argument says otherwise), so no bomb is ever decoded;
3. the decode (``load``), EXIF orientation and the conversion to RGB (:func:`to_rgb`). Any exception a
   decoder raises for one file, whatever its type, becomes that file's one error.

Conversions work in bands of rows, so a large image costs its decoded size plus its RGB copy, never a
float64 copy of the whole image.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

# Pillow's own warning threshold: 0.25 GiB of 8-bit RGB, several times any camera photo. Images above
# 2x PIL.Image.MAX_IMAGE_PIXELS are also refused by Pillow itself, whatever max_pixels says.
MAX_PIXELS = 89_478_485
# Pillow readers of the photo formats we decode, the only ones Pillow may run on a file (some others, ICO
# for one, decode while reading the header). The JPEG reader also opens MPO files (JPEGs with a multi-picture
# index, from many phone cameras). TIFF stays (scanners, archives; DALI reads it too); GIF does not
# (animations and palettes, and DALI cannot decode it), nor the other formats Pillow knows (ICO, PCX, TGA,
# EPS, SGI, PPM, JPEG 2000, ...).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# Names that are taken for images when a folder is listed; the content then decides (a .gif is listed
# and refused with a reason rather than silently skipped).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k"})

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Train-time resize before the random crop, as a ratio of the crop (224 -> 252).
TRAIN_RESIZE_RATIO = 1.125

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BAND_PIXELS = 1 << 20  # pixels converted at a time: conversion temporaries stay a few MB


class ImageLoadError(ValueError):
    """A file could not be used as an image. The message names the file; ``kind`` says why
    (``unreadable``, ``empty-file``, ``not-an-image``, ``unsupported-format``, ``decompression-bomb``,
    ``truncated``, ``corrupt``, ``unsupported-mode``) and ``detail`` is the message without the path."""

    def __init__(self, message: str, kind: str = "corrupt", detail: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = message if detail is None else detail


def _error(path: Path, kind: str, detail: str) -> ImageLoadError:
    return ImageLoadError(f"{path}: {detail}", kind, detail)


def _decode_kind(e: BaseException) -> str:
    if isinstance(e, (Image.DecompressionBombError, MemoryError)):
        return "decompression-bomb"
    text = str(e).lower()
    if isinstance(e, EOFError) or "truncated" in text or "premature end" in text:
        return "truncated"
    return "corrupt"


# --------------------------------------------------------------------------------------------
# File -> header -> RGB
# --------------------------------------------------------------------------------------------
def _file_size(path: Path) -> int:
    """Size of a regular, non-empty file; anything else raises (a FIFO would block an open)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _error(path, "unreadable", "no such image file") from None
    except OSError as e:
        raise _error(path, "unreadable", f"cannot stat: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise _error(path, "unreadable", f"{what}, not an image file")
    if st.st_size == 0:
        raise _error(path, "empty-file", "zero bytes")
    return st.st_size


def _open_regular(path: Path):
    """Open for reading without blocking, and check it is still the regular file that was stat'ed (a name swapped
    for a FIFO between the stat and the open would otherwise block the open forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise _error(path, "unreadable", f"cannot open: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _error(path, "unreadable", "not a regular file, not an image file")
    return os.fdopen(fd, "rb")


def _sniff(head: bytes) -> str | None:
    """The format Pillow would take ``head`` (the first 16 bytes) for, from its signature alone."""
    Image.init()
    return next((fmt for fmt in Image.ID if Image.OPEN[fmt][1] and Image.OPEN[fmt][1](head)), None)


def _read_header(f, path: Path, size: int) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the pixel limit is checked (and said) by the caller, not warned twice
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(f, formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        pass
    except Exception as e:  # noqa: BLE001 - a header parser may raise anything for one bad file
        raise _error(path, _decode_kind(e), f"cannot read the header ({type(e).__name__}: {e})") from None
    f.seek(0)
    head = f.read(16)
    fmt = _sniff(head)
    if fmt in ACCEPTED_FORMATS:
        raise _error(path, "corrupt", f"{fmt} signature but the header cannot be read")
    if fmt is not None:
        raise _error(path, "unsupported-format",
                     f"{fmt} signature: not an accepted format (accepted: {', '.join(ACCEPTED_FORMATS)})")
    raise _error(path, "not-an-image", f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)}; "
                                       f"{size} bytes, no known signature)")  # its bytes are never echoed


def release_image_memory_promptly(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve every buffer of ``threshold`` bytes or more by mmap (returned to the system when
    freed). Its default threshold rises to 32 MB after the first large free, after which an image's 16 MB blocks come
    from per-thread heaps that keep freed memory resident: loader threads then hold their past images' pages.
    False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3: M_MMAP_THRESHOLD (also fixes it: no dynamic raise)
    except (OSError, AttributeError):
        return False


class PixelBudget:
    """Threads decode together only while their images' pixels add up to at most ``limit``: a pool of loader
    threads holds at most one image of the pixel limit in memory at a time, however many workers it has."""

    def __init__(self, limit: int = MAX_PIXELS) -> None:
        self._limit = self._free = max(1, limit)
        self._cond = threading.Condition()

    @contextmanager
    def take(self, pixels: int) -> Iterator[None]:
        n = min(pixels, self._limit)
        with self._cond:
            self._cond.wait_for(lambda: self._free >= n)
            self._free -= n
        try:
            yield
        finally:
            with self._cond:
                self._free += n
                self._cond.notify_all()


@contextmanager
def open_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Iterator[Image.Image]:
    """The image of ``path`` with its header read and checked (steps 1-2 of the module docstring), not decoded.

    ``max_pixels`` None means ``MAX_PIXELS`` at call time. Decode with :func:`decode_rgb` inside the block.
    """
    path = Path(path)
    size = _file_size(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    f = _open_regular(path)
    with f:
        im = _read_header(f, path, size)
        w, h = im.size
        if w * h > limit:
            raise _error(path, "decompression-bomb",
                         f"{w}x{h} = {w * h} pixels is over the limit of {limit}; not decoded")
        yield im


def reduce_jpeg_scale(im: Image.Image, image_size: int) -> None:
    """Let a JPEG from :func:`open_image` decode at libjpeg's reduced scale (DCT scaling by 1/2, 1/4 or 1/8)
    where the result stays at least twice ``image_size`` on both sides; other formats are left as they are.

    For captioning only (the model sees ``image_size`` pixels): a 12-Mpx photo for a 256-px model decodes at
    1000x750, far faster than a full decode and its resize, and the antialiased resize from twice the size
    changes the input little (Pillow's thumbnail() makes the same trade by default, ``reducing_gap=2``).
    Flickr8k-sized images (500x375) are never reduced for a 256-px model. Training and the dataset check
    decode in full.
    """
    if im.format in ("JPEG", "MPO"):
        im.draft(None, (2 * image_size, 2 * image_size))  # square: the same whatever the EXIF orientation


def decode_rgb(im: Image.Image, path: str | os.PathLike[str], exif_transpose: bool = True, *,
               grey_ok: bool = False) -> Image.Image:
    """Decode an image from :func:`open_image` and return it in RGB (step 3); errors name ``path``.

    ``grey_ok``: a grey source (L, and 16/32-bit or float grey) comes back as "L" instead, a third of RGB's memory
    at full size; :class:`ImageTransform` resizes it and then makes it RGB, the same pixels (the model's path).
    """
    path = Path(path)
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's error, never the run's
        raise _error(path, _decode_kind(e), f"{im.format} {im.size[0]}x{im.size[1]} does not decode "
                                            f"({type(e).__name__}: {e})") from e
    try:
        if exif_transpose and im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - EXIF is parsed from untrusted bytes too
        raise _error(path, "corrupt", f"bad EXIF data ({type(e).__name__}: {e})") from e
    if im.mode == "RGB" or (grey_ok and im.mode == "L"):
        return im
    try:
        return to_grey(im) if grey_ok and _is_wide_grey(im.mode) else to_rgb(im)
    except MemoryError as e:
        raise _error(path, "decompression-bomb", f"out of memory converting {im.size} {im.mode}") from e
    except Exception as e:  # noqa: BLE001
        raise _error(path, "unsupported-mode", f"mode {im.mode!r} cannot be converted to RGB ({e})") from e


def load_image(path: str | os.PathLike[str], exif_transpose: bool = True, *,
               max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; any failure raises :class:`ImageLoadError`.

    Truncated files fail here (``LOAD_TRUNCATED_IMAGES`` stays off): a half-grey training image
    is worse than a clear error. EXIF orientation is applied by default, as DALI's
    ``decoders.image`` does (``adjust_orientation=True``), so both loaders see the same pixels.
    """
    with open_image(path, max_pixels) as im:
        return decode_rgb(im, path, exif_transpose)


def load_image_bytes(data: bytes, name: str = "<bytes>", exif_transpose: bool = True, *,
                     max_pixels: int | None = None, reduce_for: int | None = None) -> Image.Image:
    """:func:`load_image` for bytes in memory (an HTTP upload): the same formats, pixel limit and errors,
    with ``name`` in the messages where a path would be. No path is ever opened. ``reduce_for``: the model's
    input size, for :func:`reduce_jpeg_scale`."""
    im = _header_of_bytes(data, Path(name), max_pixels, reduce_for)
    return decode_rgb(im, Path(name), exif_transpose)


def image_bytes_size(data: bytes, name: str = "<bytes>", *, max_pixels: int | None = None,
                     reduce_for: int | None = None) -> tuple[int, int]:
    """(width, height) :func:`load_image_bytes` would decode ``data`` at, read from the header alone (nothing is
    decoded): a server's pixel budget is checked with it before any decode. Same checks and errors."""
    return _header_of_bytes(data, Path(name), max_pixels, reduce_for).size


def _header_of_bytes(data: bytes, path: Path, max_pixels: int | None, reduce_for: int | None) -> Image.Image:
    """The opened, not yet decoded image of ``data``, its pixel count checked against the limit; a JPEG set to
    decode at its reduced scale for ``reduce_for`` (what it will cost, and what it will give)."""
    if not data:
        raise _error(path, "empty-file", "zero bytes")
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    im = _read_header(io.BytesIO(data), path, len(data))
    w, h = im.size
    if w * h > limit:
        raise _error(path, "decompression-bomb", f"{w}x{h} = {w * h} pixels is over the limit of {limit}; not decoded")
    if reduce_for:
        reduce_jpeg_scale(im, reduce_for)
    return im


# --------------------------------------------------------------------------------------------
# Mode -> RGB
# --------------------------------------------------------------------------------------------
def _by_bands(img: Image.Image, convert: Callable[[Image.Image], Image.Image], mode: str = "RGB") -> Image.Image:
    """``mode`` image made of ``convert`` applied to horizontal bands of ``img``: temporaries stay one band big."""
    w, h = img.size
    out = Image.new(mode, img.size)
    rows = max(1, _BAND_PIXELS // max(w, 1))
    for top in range(0, h, rows):
        box = (0, top, w, min(h, top + rows))
        out.paste(convert(img.crop(box)), box)
    return out


def _on_white(band: Image.Image) -> Image.Image:
    if band.mode == "La":  # premultiplied grey+alpha (some TIFFs): Pillow converts it to LA only
        band = band.convert("LA")
    rgba = band.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _linear_map(mode: str, lo: float, hi: float) -> tuple[float, float]:
    """``(scale, offset)`` taking a 16/32-bit or float grey mode's values to 0..255."""
    if mode.startswith("I;16"):
        return 1 / 257, 0.0  # full 16-bit range -> 8-bit
    if mode == "F" and lo >= 0 and hi <= 1:
        return 255.0, 0.0  # float image in [0, 1]
    if lo >= 0 and hi <= 255:
        return 1.0, 0.0  # already 8-bit values
    if mode == "I" and lo >= 0 and hi <= 65535:
        return 1 / 257, 0.0  # 16-bit data held in a 32-bit mode (older Pillow opens 16-bit PNGs as "I")
    if hi > lo:
        return 255 / (hi - lo), -lo * 255 / (hi - lo)  # stretch the range
    return 0.0, 0.0  # flat (or NaN) image


def _grey_band_to_l(band: Image.Image, scale: float, offset: float) -> Image.Image:
    a = np.asarray(band, dtype=np.float64) * scale + offset  # (rows, W): one band, a few MB
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8))  # 2-D uint8 -> "L"


def _is_wide_grey(mode: str) -> bool:
    return mode in ("I", "F") or mode.startswith("I;16")


def _grey_to_8bit(img: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """The band conversion of a 16/32-bit or float grey image to 8-bit "L" (one scale for the whole image)."""
    lo, hi = (0, 0) if img.mode.startswith("I;16") else img.getextrema()  # I;16 needs no range
    scale, offset = _linear_map(img.mode, float(lo), float(hi))
    return lambda band: _grey_band_to_l(band, scale, offset)


def to_grey(img: Image.Image) -> Image.Image:
    """A 16/32-bit or float grey image as 8-bit "L", scaled as :func:`to_rgb` does (its RGB is this L, replicated)."""
    return _by_bands(img, _grey_to_8bit(img), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (always returns a new image).

    - alpha (RGBA, LA, PA, P with transparency, RGBa, La): composited onto WHITE, like a viewer
      on a white page (transparent regions of logos/drawings are usually meant as background);
    - 16/32-bit and float grey (I;16*, I, F): scaled to 0..255 (``_linear_map``), then grey->RGB;
    - everything else (1, L, P, CMYK, YCbCr, HSV, ...): ``Image.convert("RGB")``.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _by_bands(img, _on_white)
    if _is_wide_grey(mode):
        to_l = _grey_to_8bit(img)
        return _by_bands(img, lambda band: to_l(band).convert("RGB"))
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# RGB -> normalized tensor
# --------------------------------------------------------------------------------------------
def train_resize_size(image_size: int) -> int:
    """Side of the train-time resize before the random crop: round(S * 1.125), halves rounded up."""
    return math.floor(image_size * TRAIN_RESIZE_RATIO + 0.5)


class ImageTransform:
    """PIL RGB image -> normalized float32 tensor [3, S, S].

    The rule (the DALI pipeline implements the same one):
      eval : resize the whole image to (S, S), aspect ratio NOT kept (as the tutorial), bilinear
             with antialiasing (Pillow's BILINEAR filter widens its support when downscaling);
      train: resize to (S', S') the same way, S' = train_resize_size(S) = round(1.125 * S),
             then crop S x S at a uniformly random offset; horizontal flip (p=0.5) only with
             ``hflip=True`` - off by default because captions state left/right relations.
      then : x / 255, minus IMAGENET_MEAN, divided by IMAGENET_STD, per channel.
    Randomness comes from torch's global RNG (DataLoader seeds it per worker).
    A class rather than a closure so it pickles into DataLoader worker processes.
    """

    def __init__(self, image_size: int, train: bool, hflip: bool = False) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.train = train
        self.hflip = hflip
        self.resize_size = train_resize_size(image_size) if train else image_size
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, train={self.train}, "
                f"hflip={self.hflip}, resize_size={self.resize_size})")

    def __call__(self, img: Image.Image) -> Tensor:
        if img.mode not in ("RGB", "L"):
            img = to_rgb(img)
        r, s = self.resize_size, self.image_size
        img = img.resize((r, r), Image.Resampling.BILINEAR)  # L: resized alone, then replicated (same pixels)
        if img.mode == "L":
            img = img.convert("RGB")
        if self.train and r > s:
            x, y = (int(v) for v in torch.randint(0, r - s + 1, (2,)))
            img = img.crop((x, y, x + s, y + s))
        if self.train and self.hflip and bool(torch.rand(()) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S) uint8
        return (x.to(torch.float32).div_(255.0) - self._mean) / self._std


def image_transform(image_size: int, train: bool, hflip: bool = False) -> ImageTransform:
    """See :class:`ImageTransform` for the exact rule."""
    return ImageTransform(image_size, train, hflip=hflip)
