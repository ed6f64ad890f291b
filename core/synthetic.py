"""Synthetic captioning data in the exact Flickr8k, Flickr30k or COCO layout, learnable in minutes on a CPU.

    python -m core.synthetic out/synth --images 200 --seed 1 [--size 128] [--layout flickr8k|flickr30k|coco]

writes (flickr8k, the default)::

    out/synth/Images/00000.jpg ...                    one rendered scene per image
    out/synth/Flickr8k.token.txt                      00000.jpg#0<TAB>caption   (5 captions per image)

flickr30k: ``flickr30k-images/`` + Karpathy's ``dataset_flickr30k.json``; coco: ``train2014/`` + ``val2014/`` +
``dataset_coco.json`` (``filepath``/``filename``, test/val/restval images in val2014/), as core.layouts reads them.

Each scene has 1-3 shapes (circle / square / triangle), 6 well separated colours, 2 clearly
different sizes, each shape in its own cell of a 3x3 grid on a light background with a faint
gradient. The 5 captions are different paraphrases that are all TRUE of the picture:
spatial relations are only stated between shapes whose cells make them unambiguous
(same row -> "to the left of"/"to the right of", same column -> "above"/"below", otherwise the
combined "above and to the left of" ...). The vocabulary is ~45 words.

Output is a pure function of (seed, num_images, size): only ``random.Random(seed)`` is used,
JPEGs are written with fixed settings and no metadata, so two runs are byte-identical.
This module imports no torch (fast to start).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from core.captions import IMAGES_DIR, TOKEN_FILE
from core.layouts import DATASETS, FLICKR30K_IMAGE_DIRS, KARPATHY_FILES
from core.fileio import atomic_write_text

CAPTIONS_PER_IMAGE = 5
LAYOUTS = DATASETS  # every layout core.layouts reads
JPEG_QUALITY = 92

SHAPES = ("circle", "square", "triangle")
# Saturated, far apart in hue; none close to the light backgrounds below.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 215),
    "yellow": (235, 205, 10),
    "purple": (130, 40, 170),
    "orange": (245, 125, 10),
}
SIZES = ("small", "large")
# Fraction of the grid cell covered by a shape's bounding box: about 2x apart, so "small"
# and "large" are never ambiguous, whatever the image size.
_EXTENT = {"small": 0.40, "large": 0.80}
_CELL_MARGIN = 0.04  # minimum gap between a shape and its cell border (fraction of the cell)

# Light backgrounds (all channels >= 220, objects have at least one channel <= 70 except
# yellow/orange, whose blue channel is <= 10): never confusable with an object colour.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (246, 246, 246),
    (232, 232, 228),
    (250, 244, 226),
    (226, 236, 246),
    (234, 246, 234),
    (246, 234, 242),
)
_GRADIENT_DEPTH = 18  # the far side of the background gradient is this much darker

# (row, col) -> phrase naming the cell; only used for single-shape images.
_LOCATION = {
    (0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner",
}

_SYNTH_NAME_RE = re.compile(r"^\d{5,}\.jpg$")


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Shape:
    """One object of a scene. ``dx``/``dy`` are the centre's offset inside its cell (fractions of a cell)."""

    kind: str
    color: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    def phrase(self, with_size: bool = True) -> str:
        """Noun phrase: "a large red circle", or without size "an orange square"."""
        words = f"{self.size} {self.color} {self.kind}" if with_size else f"{self.color} {self.kind}"
        return f"{_article(words)} {words}"

    def center(self, image_size: int) -> tuple[float, float]:
        cell = image_size / 3
        return (self.col + 0.5 + self.dx) * cell, (self.row + 0.5 + self.dy) * cell


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in reading order (row, then column)
    background: int  # index into BACKGROUNDS
    gradient: int  # 0..3: direction of the background gradient


def relation(a: Shape, b: Shape) -> str:
    """Phrase ``r`` such that "<a> r <b>" is true. Shapes must be in different cells."""
    if (a.row, a.col) == (b.row, b.col):
        raise ValueError("shapes share a cell")
    vertical = "" if a.row == b.row else ("above" if a.row < b.row else "below")
    horizontal = "" if a.col == b.col else ("to the left of" if a.col < b.col else "to the right of")
    if vertical and horizontal:  # diagonal: both relations hold strictly, say both
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def random_scene(rng: random.Random) -> Scene:
    """Draw a scene: 1-3 shapes with distinct (colour, kind) in distinct grid cells."""
    n = rng.choices((1, 2, 3), weights=(1, 2, 2))[0]
    cells = sorted(rng.sample(range(9), n))  # sorted = reading order
    used: set[tuple[str, str]] = set()
    shapes = []
    for cell in cells:
        while True:  # distinct (colour, kind) so every phrase picks out one shape
            kind, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
            if (color, kind) not in used:
                used.add((color, kind))
                break
        size = rng.choice(SIZES)
        # Jitter the centre but keep the whole shape inside its cell: relations stay exact.
        slack = (1.0 - _EXTENT[size]) / 2 - _CELL_MARGIN
        dx, dy = rng.uniform(-slack, slack), rng.uniform(-slack, slack)
        shapes.append(Shape(kind, color, size, cell // 3, cell % 3, dx, dy))
    return Scene(tuple(shapes), rng.randrange(len(BACKGROUNDS)), rng.randrange(4))


def _captions_one(s: Shape) -> list[str]:
    loc = _LOCATION[(s.row, s.col)]
    np_, short = s.phrase(), s.phrase(with_size=False)
    return [
        f"{np_} {loc}",
        f"there is {np_} {loc}",
        f"a picture of {np_} {loc}",
        f"one shape : {np_}",
        f"an image with {short} {loc}",
        f"a single {s.size} {s.color} {s.kind}",  # "single" takes "a" whatever follows
        f"{short} {loc}",
    ]


def _captions_two(a: Shape, b: Shape) -> list[str]:
    rel, inv = relation(a, b), relation(b, a)
    return [
        f"{a.phrase()} {rel} {b.phrase()}",
        f"{b.phrase()} {inv} {a.phrase()}",
        f"there is {a.phrase()} {rel} {b.phrase()}",
        f"a picture of {a.phrase()} and {b.phrase()}",
        f"two shapes : {a.phrase()} and {b.phrase()}",
        f"there are two shapes : {a.phrase(False)} and {b.phrase(False)}",
        f"{a.phrase(False)} {rel} {b.phrase(False)}",
    ]


def _captions_three(rng: random.Random, a: Shape, b: Shape, c: Shape) -> list[str]:
    # Prefer a pair sharing a row or column for the relation (the simplest true statement).
    pairs = [(x, y) for x, y in ((a, b), (a, c), (b, c)) if x.row == y.row or x.col == y.col]
    x, y = rng.choice(pairs) if pairs else (a, b)
    listing = f"{a.phrase()} , {b.phrase()} and {c.phrase()}"
    return [
        f"three shapes : {listing}",
        f"there are three shapes : {listing}",
        f"a picture of {listing}",
        f"three shapes with {x.phrase()} {relation(x, y)} {y.phrase()}",
        f"{y.phrase(False)} {relation(y, x)} {x.phrase(False)} among three shapes",
        f"an image with {a.phrase(False)} , {b.phrase(False)} and {c.phrase(False)}",
    ]


def describe(scene: Scene, rng: random.Random, k: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``k`` distinct true captions of ``scene``, chosen at random among the templates."""
    s = scene.shapes
    if len(s) == 1:
        pool = _captions_one(s[0])
    elif len(s) == 2:
        pool = _captions_two(*s)
    else:
        pool = _captions_three(rng, *s)
    return rng.sample(pool, k)


_GRADIENTS: dict[int, tuple[Image.Image, ...]] = {}


def _gradient_masks(size: int) -> tuple[Image.Image, ...]:
    """Four linear-gradient masks (top->bottom, left->right and reverses), cached per size."""
    if size not in _GRADIENTS:
        g = Image.linear_gradient("L").resize((size, size), Image.Resampling.BILINEAR)
        _GRADIENTS[size] = (
            g,
            g.transpose(Image.Transpose.ROTATE_90),
            g.transpose(Image.Transpose.ROTATE_180),
            g.transpose(Image.Transpose.ROTATE_270),
        )
    return _GRADIENTS[size]


def render(scene: Scene, size: int = 128) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` x ``size`` pixels."""
    light = BACKGROUNDS[scene.background]
    dark = tuple(max(0, v - _GRADIENT_DEPTH) for v in light)
    img = Image.composite(Image.new("RGB", (size, size), dark), Image.new("RGB", (size, size), light),
                          _gradient_masks(size)[scene.gradient])
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for s in scene.shapes:
        cx, cy = s.center(size)
        r = _EXTENT[s.size] * cell / 2  # half of the bounding box
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            q = 0.9 * r  # a square looks bigger than a circle of the same box
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        else:  # equilateral-ish triangle pointing up, centred in the box
            h = 0.9 * r
            draw.polygon([(cx, cy - r), (cx - r, cy + h), (cx + r, cy + h)], fill=fill)
    return img


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # Fixed settings, no EXIF/ICC/comment: identical bytes for identical pixels.
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _check_overwritable(out: Path) -> None:
    """Refuse to write into a directory that holds a dataset we did not generate (e.g. real Flickr8k)."""
    foreign: list[str] = []
    token = out / TOKEN_FILE
    if token.is_file():
        with open(token, encoding="utf-8", errors="replace") as f:
            for line in f:
                name = line.split("#", 1)[0].strip()
                if name and not _SYNTH_NAME_RE.match(name):
                    foreign.append(f"{token} names {name!r}")
                    break
    images = out / IMAGES_DIR
    if images.is_dir():
        for entry in os.scandir(images):
            if not _SYNTH_NAME_RE.match(entry.name):
                foreign.append(f"{images} holds {entry.name!r}")
                break
    if foreign:
        raise FileExistsError(
            f"{out} looks like a dataset this generator did not write ({'; '.join(foreign)}); "
            "choose another directory or pass --force to write into it anyway")


def _karpathy_split(i: int, layout: str) -> str:
    """Every 10th image test, the next val, for COCO the next restval (Karpathy's train-time extra), rest train."""
    split = {0: "test", 1: "val", 2: "restval" if layout == "coco" else "train"}.get(i % 10, "train")
    return split


def _image_folder(layout: str, split: str) -> str:
    if layout == "flickr30k":
        return FLICKR30K_IMAGE_DIRS[0]
    return "train2014" if split == "train" else "val2014"  # COCO: Karpathy's val/test/restval come from val2014


def _check_karpathy_overwritable(out: Path, layout: str) -> None:
    path = out / KARPATHY_FILES[layout]
    if path.is_file():
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("synthetic") is True
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{path} was not written by this generator; choose another directory or pass "
                                  "--force to write into it anyway")


def _write_images(out: Path, num_images: int, seed: int, size: int, folder_of) -> list[tuple[str, str, list[str]]]:
    """Render the scenes: ``(folder, file name, captions)`` of each, the images written under ``out/folder``."""
    rng = random.Random(seed)
    width = max(5, len(str(num_images - 1)))
    written = []
    for i in range(num_images):
        scene = random_scene(rng)
        folder, name = folder_of(i), f"{i:0{width}d}.jpg"
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / folder / name).write_bytes(_jpeg_bytes(render(scene, size)))
        written.append((folder, name, describe(scene, rng)))
    for folder in {f for f, _, _ in written}:  # leftovers of an earlier, larger run
        names = {n for f, n, _ in written if f == folder}
        for entry in os.scandir(out / folder):
            if _SYNTH_NAME_RE.match(entry.name) and entry.name not in names:
                os.unlink(entry.path)
    return written


def _write_karpathy(out: Path, layout: str, written: list[tuple[str, str, list[str]]]) -> None:
    images = []
    for i, (folder, name, caps) in enumerate(written):
        entry = {"filename": name, "imgid": i, "split": _karpathy_split(i, layout),
                 "sentences": [{"raw": c, "tokens": c.split(), "imgid": i} for c in caps]}
        if layout == "coco":
            entry = {"filepath": folder, "cocoid": i, **entry}
        images.append(entry)
    text = json.dumps({"dataset": layout, "synthetic": True, "images": images}, separators=(",", ":"))
    atomic_write_text(out / KARPATHY_FILES[layout], text + "\n")


def generate(out_dir: str | os.PathLike[str], num_images: int, seed: int = 0, size: int = 128,
             force: bool = False, layout: str = "flickr8k") -> Path:
    """Write ``num_images`` scenes and their captions under ``out_dir`` in ``layout``; return ``out_dir``.

    flickr8k: Images/ + Flickr8k.token.txt; flickr30k: flickr30k-images/ + dataset_flickr30k.json; coco:
    train2014/ + val2014/ + dataset_coco.json (filepath/filename, restval). Overwrites a previous synthetic dataset
    in place (stale ``NNNNN.jpg`` from a larger earlier run are removed so images and captions always match); the
    caption file is replaced atomically.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels (small shapes would vanish), got {size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir)
    if not force:
        _check_overwritable(out) if layout == "flickr8k" else _check_karpathy_overwritable(out, layout)
    if layout == "flickr8k":
        written = _write_images(out, num_images, seed, size, lambda i: IMAGES_DIR)
        atomic_write_text(out / TOKEN_FILE, "".join(f"{name}#{k}\t{c}\n" for _, name, caps in written
                                                    for k, c in enumerate(caps)))
    else:
        written = _write_images(out, num_images, seed, size,
                                lambda i: _image_folder(layout, _karpathy_split(i, layout)))
        _write_karpathy(out, layout, written)
    return out


def _distinct_words(out: Path, layout: str) -> set[str]:
    if layout == "flickr8k":
        with open(out / TOKEN_FILE, encoding="utf-8") as f:
            return {w for line in f for w in re.findall(r"[a-z]+", line.split("\t", 1)[1])}
    images = json.loads((out / KARPATHY_FILES[layout]).read_text(encoding="utf-8"))["images"]
    return {w for img in images for s in img["sentences"] for w in re.findall(r"[a-z]+", s["raw"])}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m core.synthetic",
        description="Write a synthetic captioning dataset in the Flickr8k layout (Images/ + Flickr8k.token.txt).")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> byte-identical output")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--layout", choices=LAYOUTS, default="flickr8k",
                   help="flickr8k: Images/ + Flickr8k.token.txt; flickr30k: flickr30k-images/ + "
                        "dataset_flickr30k.json; coco: train2014/ + val2014/ + dataset_coco.json (default flickr8k)")
    p.add_argument("--force", action="store_true",
                   help="write even if OUT looks like a dataset this tool did not generate")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = generate(args.out, args.images, seed=args.seed, size=args.size, force=args.force, layout=args.layout)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    dt = time.perf_counter() - t0
    words = _distinct_words(out, args.layout)
    print(f"wrote {args.images} images ({args.size}px) and {args.images * CAPTIONS_PER_IMAGE} captions "
          f"({len(words)} distinct words) to {out} in the {args.layout} layout in {dt:.2f}s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
