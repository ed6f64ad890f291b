"""A folder of many bad and odd inputs for `python -m export.caption`, and a run over it with its peak memory.

    python tests/support/image_folder.py [--work DIR]     # builds the folder and a tiny export, runs, prints a summary

``build(folder)`` writes the files and returns ``Corpus(good, bad, extra_args)``: the names that must be captioned,
the names that must each get exactly one error line, and the extra command-line inputs (special files given by
path). Classes (counts in ``CLASSES``): accepted photos in every mode; formats Pillow opens by content that are
refused; decompression bombs (a header declaring a huge size) of every PNG colour type and bit depth, and of
JPEG, BMP, TIFF, WebP; a large 16-bit image under the limit (converted, not refused); truncated and corrupt files;
hostile names (tab + newline forging an output line, terminal escapes, carriage return, bidi override,
non-UTF-8 bytes, a 255-byte name); special files (FIFO, /dev/zero, /dev/null, a symlink loop, a directory
symlink loop, a dangling symlink). Used by tests/robustness/test_robustness_caption.py.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.support import corpus  # noqa: E402
from tests.support.memory import WRAPPER, make_export  # noqa: E402

REFUSED_FORMATS = ["GIF", "ICO", "PCX", "TGA", "SGI", "PPM", "JPEG2000", "DDS", "QOI", "IM", "SPIDER", "EPS",
                   "PDF", "XBM", "PALM", "MSP"]
# PNG colour type -> bit depths (every combination the format allows)
PNG_MODES = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


@dataclass
class Corpus:
    good: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)
    extra_args: list[str] = field(default_factory=list)  # inputs given by path, each bad
    classes: dict[str, int] = field(default_factory=dict)


def _encode(im: Image.Image, fmt: str) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def _photo(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(color_type: int, depth: int, side: int = 60_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", side, side, depth, color_type, 0, 0, 0)
    plte = _chunk(b"PLTE", bytes(range(48))) if color_type == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + plte + _chunk(b"IDAT", zlib.compress(b"\0" * 256))
            + _chunk(b"IEND", b""))


def large_png(width: int, height: int, depth: int, color_type: int, row: bytes) -> bytes:
    """A real PNG of width x height, every row ``row`` (filter 0), streamed into zlib: a few hundred KB."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    z, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(z.compress(b"\0" + row))
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _header_bombs() -> dict[str, bytes]:
    """Real small files of each other accepted format with the declared size patched to 60000 x 60000."""
    small = _photo(1, 16)
    jpg = bytearray(_encode(small, "JPEG"))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    bmp = bytearray(_encode(small, "BMP"))
    bmp[18:26] = struct.pack("<ii", 60000, 60000)
    webp = bytearray(_encode(small, "WEBP"))  # lossy VP8: 14-bit sizes at offset 26
    webp[26:30] = struct.pack("<HH", 16000, 16000)
    return {"bomb_sof.jpg": bytes(jpg), "bomb.bmp": bytes(bmp), "bomb.webp": bytes(webp), "bomb.tif": _tiff_bomb(small)}


def _tiff_bomb(small: Image.Image) -> bytes:
    tif = bytearray(_encode(small, "TIFF"))  # little-endian: "II*\0", then the first IFD's offset
    ifd = struct.unpack_from("<I", tif, 4)[0]
    for k in range(struct.unpack_from("<H", tif, ifd)[0]):
        entry = ifd + 2 + 12 * k
        tag, typ = struct.unpack_from("<HH", tif, entry)
        if tag in (256, 257):  # ImageWidth, ImageLength
            struct.pack_into("<I" if typ == 4 else "<H", tif, entry + 8, 60000)
    return bytes(tif)


def _write(folder: Path, name: str | bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), os.fsencode(name)), "wb") as f:
        f.write(data)


def _add(c: Corpus, cls: str, folder: Path, files: dict, good: bool) -> None:
    for name, data in files.items():
        _write(folder, name, data)
        (c.good if good else c.bad).add(os.fsdecode(name))
    c.classes[cls] = c.classes.get(cls, 0) + len(files)


def build(folder: Path, large: bool = True) -> Corpus:
    folder.mkdir(parents=True)
    c = Corpus()
    _add(c, "accepted photos, every mode and format", folder, corpus.valid_variants(), True)
    refused = {f"refused_{f.lower()}.jpg": _encode(_photo(2).convert("F") if f == "SPIDER" else
                                                  _photo(2).convert("1") if f in ("XBM", "MSP", "PALM") else
                                                  _photo(2), f) for f in REFUSED_FORMATS}
    _add(c, "formats Pillow opens by content, refused", folder, refused, False)
    bombs = {f"bomb_png_type{t}_{d}bit.png": png_bomb(t, d) for t, depths in PNG_MODES.items() for d in depths}
    _add(c, "decompression bombs (PNG every colour type and depth; JPEG, BMP, TIFF, WebP)", folder,
         {**bombs, **_header_bombs(), "bomb_rgba_13000.png": large_png(13000, 13000, 8, 6, bytes(13000 * 4))}, False)
    if large:  # 88.4 M pixels, just under the limit: decoded and converted without float64 copies
        ramp = np.linspace(0, 65535, 9400).astype(">u2").tobytes()
        _add(c, "16-bit grey 9400x9400 (under the pixel limit)", folder,
             {"large_grey16.png": large_png(9400, 9400, 16, 0, ramp)}, True)
    broken = {"truncated.jpg": corpus.truncated_jpeg(), "truncated.png": corpus.truncated_png(),
              "corrupt.png": corpus.corrupt_png(), "empty.jpg": b"", "readme.jpg": corpus.text_named_jpg(),
              "error_page.png": corpus.html_error_page()}
    _add(c, "truncated, corrupt, empty, not images", folder, broken, False)
    ok = corpus.jpeg(seed=20)
    names = {"forged\tfake caption\nx.jpg": ok, "escape\x1b[2J\x1b[31mred.jpg": ok, "carriage\rreturn.jpg": ok,
             "bidi\u202egpj.exe.jpg": ok, b"latin1_\xe9t\xe9.jpg": ok, "caf\u00e9_\u5199\u771f.jpg": ok,
             "-starts-with-dash.jpg": ok, "a.jpg": ok, "a_attention.png": ok, "x" * 251 + ".jpg": ok}
    _add(c, "hostile names (control characters, non-UTF-8, 255 bytes, colliding figure names)", folder, names, True)
    _special(c, folder)
    return c


def _special(c: Corpus, folder: Path) -> None:
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "null.jpg").symlink_to("/dev/null")
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "dangling.jpg").symlink_to("no_such_target.jpg")
    c.bad |= {"fifo.jpg", "zero.jpg", "null.jpg", "loop.jpg", "dangling.jpg"}
    sub = folder / "dirloop"
    sub.mkdir()
    (sub / "self").symlink_to(".")  # dirloop/self/self/... never ends
    given = folder.parent / f"{folder.name}_given_fifo"
    os.mkfifo(given)
    c.extra_args = [str(given), "/dev/zero", "/dev/null", str(sub / "self" / "self" / "self")]
    c.classes["special files (FIFO, /dev/zero, /dev/null, symlink loop, dangling link; in the folder)"] = 5
    c.classes["given by path (FIFO, /dev/zero, /dev/null, a directory symlink loop)"] = 4


def run_caption(model: Path, folder: Path, corpus_: Corpus, save_dir: Path | None, env: dict | None = None):
    """(CompletedProcess, peak RSS in KiB) of export.caption over the folder, measured in a wrapper process."""
    cmd = [sys.executable, "-m", "export.caption", str(folder), *corpus_.extra_args, "--model", str(model),
           "--beam-size", "2", "--max-decode-len", "5", "--batch-size", "8", "--threads", "1"]
    if save_dir is not None:
        cmd += ["--save-dir", str(save_dir)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        wrapper = WRAPPER.replace("stdout=subprocess.DEVNULL, stderr=subprocess.PIPE",
                                   f"stdout=open({out.fileno()}, 'wb', closefd=False), "
                                   f"stderr=open({err.fileno()}, 'wb', closefd=False)")
        r = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, pass_fds=(out.fileno(), err.fileno()),
                           env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        peak, rc, _ = r.stdout.split()
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, int(rc), out.read(), err.read())
    return proc, int(peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="robustness_folder_"))
    c = build(work / "inputs")
    proc, peak = run_caption(make_export(work), work / "inputs", c, work / "figures")
    sys.stdout.buffer.write(proc.stdout)
    sys.stdout.buffer.write(proc.stderr)
    for cls, n in c.classes.items():
        print(f"{n:4d}  {cls}")
    print(f"exit {proc.returncode}, peak RSS {peak / 1024:.0f} MiB, {len(c.good)} good, "
          f"{len(c.bad) + len(c.extra_args)} bad inputs")


if __name__ == "__main__":
    main()
