"""Bad (and awkward but valid) input files, generated in memory: nothing is downloaded.

Used by tests/unit/data/test_datacheck.py and tests/robustness/. Every function returns the bytes of one file.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image, ImageDraw


def _noise_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A busy picture (compresses badly, so a cut file is clearly missing image data)."""
    rng = random.Random(seed)
    im = Image.new("RGB", size, (200, 200, 200))
    d = ImageDraw.Draw(im)
    for _ in range(40):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        d.ellipse((x - 6, y - 6, x + 6, y + 6), fill=tuple(rng.randrange(256) for _ in range(3)))
    return im.convert(mode) if mode != "RGB" else im


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def jpeg(size: tuple[int, int] = (48, 48), seed: int = 0, mode: str = "RGB") -> bytes:
    return encode(_noise_image(size, mode, seed), "JPEG", quality=90)


def png(size: tuple[int, int] = (48, 48), seed: int = 0, mode: str = "RGB", **kw) -> bytes:
    return encode(_noise_image(size, mode, seed), "PNG", **kw)


def truncated_jpeg(keep: float = 0.6) -> bytes:
    data = jpeg((64, 64), seed=3)
    return data[: int(len(data) * keep)]


def truncated_png(keep: float = 0.6) -> bytes:
    data = png((64, 64), seed=4)
    return data[: int(len(data) * keep)]


def text_named_jpg() -> bytes:
    return b"This is a README, not a photo.\nIt just has a .jpg name.\n"


def html_error_page() -> bytes:
    """What a failed download often leaves behind under an image name."""
    return b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height (10 G pixels by default) over a few bytes of data.

    Anything that decodes it before looking at the size would try to allocate gigabytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    """A PNG whose compressed image data is garbage (chunk CRCs recomputed, so only decoding can tell)."""
    im = _noise_image((48, 48), seed=5)
    raw = b"".join(b"\x00" + im.tobytes()[y * 48 * 3:(y + 1) * 48 * 3] for y in range(48))
    idat = bytearray(zlib.compress(raw))
    for i in range(10, len(idat) - 10, 7):
        idat[i] ^= 0x5A
    ihdr = struct.pack(">IIBBBBB", 48, 48, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(idat)) + _chunk(b"IEND", b"")


def tiff_premultiplied_grey_alpha(size: tuple[int, int] = (16, 16)) -> bytes:
    """A baseline TIFF, 8-bit grey + associated (premultiplied) alpha: Pillow opens it in mode "La"."""
    w, h = size
    pixels = bytes(v for y in range(h) for x in range(w) for v in ((x * 16) % 256, 255))
    data_offset = 8  # header (8 bytes) | pixel data | IFD
    ifd_offset = data_offset + len(pixels)
    tags = [  # (tag, type, value); type 3 = SHORT, 4 = LONG; every value fits in its entry
        (256, 3, w), (257, 3, h), (258, 3, (8, 8)),  # BitsPerSample 8, 8
        (259, 3, 1), (262, 3, 1),  # no compression, BlackIsZero
        (273, 4, data_offset), (277, 3, 2), (278, 3, h), (279, 4, len(pixels)),
        (338, 3, 1),  # ExtraSamples = associated alpha
    ]
    entries = []
    for tag, typ, value in tags:
        if isinstance(value, tuple):
            entries.append(struct.pack("<HHIHH", tag, typ, 2, *value))
        elif typ == 3:
            entries.append(struct.pack("<HHIHH", tag, typ, 1, value, 0))
        else:
            entries.append(struct.pack("<HHII", tag, typ, 1, value))
    ifd = struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + ifd


def gif() -> bytes:
    return encode(_noise_image((32, 32), seed=6).convert("P"), "GIF")


def exif_rotated_jpeg() -> bytes:
    im = _noise_image((40, 24), seed=7)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return encode(im, "JPEG", exif=exif.tobytes())


def valid_variants() -> dict[str, bytes]:
    """Awkward files that ARE usable (converted by core.images.to_rgb's rules); a check must accept them."""
    p_transparent = _noise_image((32, 32), seed=8).convert("P")
    i16 = Image.frombytes("I;16", (24, 24), bytes(random.Random(9).randrange(256) for _ in range(24 * 24 * 2)))
    return {
        "ok_grey.jpg": jpeg((40, 40), seed=10, mode="L"),
        "ok_cmyk.jpg": jpeg((40, 40), seed=11, mode="CMYK"),
        "ok_rgba.png": png((40, 40), seed=12, mode="RGBA"),
        "ok_la.png": png((40, 40), seed=13, mode="LA"),
        "ok_palette_transparent.png": encode(p_transparent, "PNG", transparency=0),
        "ok_16bit.png": encode(i16, "PNG"),
        "ok_bilevel.png": png((40, 40), seed=14, mode="1"),
        "ok_png_named.jpg": png((40, 40), seed=15),
        "ok_exif_rotated.jpg": exif_rotated_jpeg(),
        "ok_min_side.jpg": jpeg((8, 64), seed=16),
        "ok_webp.webp": encode(_noise_image((32, 32), seed=17), "WEBP"),
        "ok_tiff.tif": encode(_noise_image((32, 32), seed=18), "TIFF"),
        "ok_bmp.bmp": encode(_noise_image((32, 32), seed=19), "BMP"),
    }
