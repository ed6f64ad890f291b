"""Flickr8k data: caption files, train/val/test splits, caption tensors, image loading, datasets.

Expected layout (the real dataset, or one made by ``python -m core.synthetic DIR``)::

    DATA_DIR/Images/*.jpg
    DATA_DIR/Flickr8k.token.txt                 IMAGE.jpg#N<TAB>caption
    DATA_DIR/Flickr_8k.{train,dev,test}Images.txt   optional official split (one image name a line)

or captions and splits from Karpathy's ``dataset_flickr8k.json`` (``karpathy_json=``).

Captions and images travel separately: a dataset yields ``(image, index)`` and the batch's
captions are looked up with :meth:`CaptionTable.sample`, one rule for the torch and DALI loaders.

    python -m core.data info DATA_DIR          counts of images, captions, splits, vocabulary
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from core.fileio import read_json
from core.vocab import Vocabulary, tokenize

TOKEN_FILE = "Flickr8k.token.txt"
IMAGES_DIR = "Images"
OFFICIAL_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
SPLIT_NAMES = ("train", "val", "test")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Train-time resize before the random crop, as a ratio of the crop (224 -> 252).
TRAIN_RESIZE_RATIO = 1.125

_LAYOUT_HELP = (
    "expected layout:\n"
    "  {root}/Images/*.jpg\n"
    "  {root}/Flickr8k.token.txt   (lines 'IMAGE.jpg#N<TAB>caption')\n"
    "make a synthetic dataset with that layout: `python -m core.synthetic {root} --images 200 --seed 1` "
    "(or `./launch.sh demo`)"
)


class DataFormatError(ValueError):
    """A data file exists but its content is not what was expected (message names file and line)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset directory, its Images/ folder or its caption file is missing."""


class ImageLoadError(ValueError):
    """A file could not be decoded as an image (message names the file)."""


# --------------------------------------------------------------------------------------------
# Caption files
# --------------------------------------------------------------------------------------------
def _read_lines(path: Path) -> Iterable[tuple[int, str]]:
    """Yield ``(lineno, text)`` decoding each line as UTF-8 so an error can name its line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataFormatError(
                    f"{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None


def parse_caption_line(line: str) -> tuple[str, str, str]:
    """``(image, number, caption)`` of one ``IMAGE#N<TAB>caption`` line; DataFormatError says what is wrong."""
    key, tab, caption = line.partition("\t")
    if not tab:
        raise DataFormatError(f"expected 'IMAGE#N<TAB>caption', found no tab in {line[:80]!r}")
    name, hash_, n = key.strip().rpartition("#")
    if not hash_ or not name:
        raise DataFormatError(f"expected 'IMAGE#N' before the tab, got {key!r}")
    if not n.isdigit():
        raise DataFormatError(f"expected an integer caption number after '#', got {key!r}")
    caption = caption.strip()
    if not caption:
        raise DataFormatError(f"empty caption for {key!r}")
    return name, n, caption


def parse_token_file(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Parse ``Flickr8k.token.txt`` into ``{image name: [captions in file order]}``.

    Each non-blank line is ``IMAGE#N<TAB>caption`` with ``N`` a non-negative integer; images
    keep the order of their first appearance. Any other line raises :class:`DataFormatError`
    naming ``path:line``.
    """
    path = Path(path)
    captions: dict[str, list[str]] = {}
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            name, _, caption = parse_caption_line(line)
        except DataFormatError as e:
            raise DataFormatError(f"{path}:{lineno}: {e}") from None
        captions.setdefault(name, []).append(caption)
    if not captions:
        raise DataFormatError(f"{path}: no captions found (empty file?)")
    return captions


@dataclass
class Splits:
    """Image names of each split. No image is in two splits (checked on creation)."""

    train: list[str]
    val: list[str]
    test: list[str]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for split in SPLIT_NAMES:
            for name in self[split]:
                if name in seen:
                    raise ValueError(f"image {name!r} is in both the {seen[name]} and the {split} split")
                seen[name] = split

    def __getitem__(self, split: str) -> list[str]:
        if split not in SPLIT_NAMES:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, split)

    def sizes(self) -> dict[str, int]:
        return {s: len(self[s]) for s in SPLIT_NAMES}


def load_karpathy_json(path: str | os.PathLike[str]) -> tuple[dict[str, list[str]], Splits]:
    """Captions and splits from Karpathy's ``dataset_flickr8k.json``.

    Uses ``images[].filename``, ``images[].split`` and ``images[].sentences[].raw``;
    ``restval`` images go to train (the usual practice).
    """
    path = Path(path)
    data = read_json(path, DataFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(f"{path}: expected a JSON object with an 'images' list")
    captions: dict[str, list[str]] = {}
    split_lists: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        try:
            name, split, sentences = img["filename"], img["split"], img["sentences"]
            raws = [s["raw"] for s in sentences]
        except (KeyError, TypeError) as e:
            raise DataFormatError(
                f"{where}: expected keys 'filename', 'split', 'sentences[].raw' (missing {e})") from None
        split = "train" if split == "restval" else split
        if split not in split_lists:
            raise DataFormatError(f"{where}: unknown split {img['split']!r} (expected train/val/test/restval)")
        if name in captions:
            raise DataFormatError(f"{where}: image {name!r} listed twice")
        raws = [r.strip() for r in raws if isinstance(r, str) and r.strip()]
        if not raws:
            raise DataFormatError(f"{where}: image {name!r} has no captions")
        captions[name] = raws
        split_lists[split].append(name)
    if not captions:
        raise DataFormatError(f"{path}: 'images' is empty")
    return captions, Splits(**split_lists)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------
def read_official_splits(data_dir: str | os.PathLike[str], known: Iterable[str]) -> Splits:
    """Read ``Flickr_8k.{train,dev,test}Images.txt``; every name must be in ``known``."""
    data_dir = Path(data_dir)
    known = set(known)
    lists: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split, fname in OFFICIAL_SPLIT_FILES.items():
        path = data_dir / fname
        names: list[str] = []
        for lineno, line in _read_lines(path):
            name = line.strip()
            if not name:
                continue
            if name not in known:
                raise DataFormatError(
                    f"{path}:{lineno}: image {name!r} has no captions "
                    f"(not in {TOKEN_FILE}, or its file is missing from {IMAGES_DIR}/)")
            if name in seen:
                raise DataFormatError(f"{path}:{lineno}: image {name!r} already listed ({seen[name]})")
            seen[name] = f"{path.name}:{lineno}"
            names.append(name)
        lists[split] = names
    return Splits(**lists)


def random_splits(names: Iterable[str], seed: int = 0, val_frac: float = 0.1,
                  test_frac: float = 0.1) -> Splits:
    """Deterministic split by image: sort the names, shuffle with ``random.Random(seed)``, cut.

    Split sizes are ``round(n * frac)``, raised to 1 for a non-zero fraction while train keeps
    at least one image. Each split's list is sorted.
    """
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, test_frac and val_frac + test_frac < 1, "
                         f"got {val_frac}, {test_frac}")
    order = sorted(set(names))  # sort first: the split must not depend on dict/file order
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val, n_test = round(n * val_frac), round(n * test_frac)
    # "At least one image per split when possible": a tiny dataset still gets val and test.
    if val_frac > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if test_frac > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return Splits(sorted(train), sorted(val), sorted(test))


def make_splits(names: Iterable[str], data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                val_frac: float = 0.1, test_frac: float = 0.1) -> Splits:
    """Official split files when ``data_dir`` holds all three, else :func:`random_splits`."""
    names = list(names)
    if data_dir is not None:
        present = [f for f in OFFICIAL_SPLIT_FILES.values() if (Path(data_dir) / f).is_file()]
        if len(present) == len(OFFICIAL_SPLIT_FILES):
            return read_official_splits(data_dir, names)
        if present:  # half an official split is more likely a mistake than an intent
            missing = sorted(set(OFFICIAL_SPLIT_FILES.values()) - set(present))
            raise DataFormatError(f"{data_dir}: found {present} but not {missing}; "
                                  "provide all three official split files or none")
    return random_splits(names, seed=seed, val_frac=val_frac, test_frac=test_frac)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------
@dataclass
class Flickr8k:
    """Captions and splits of a dataset directory. Only images present in ``images_dir`` are kept."""

    root: Path
    images_dir: Path
    captions: dict[str, list[str]]
    splits: Splits
    missing_images: list[str] = field(default_factory=list)  # captioned but absent from Images/

    def image_path(self, name: str) -> Path:
        return self.images_dir / name

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    def build_vocab(self, min_freq: int = 1, split: str = "train") -> Vocabulary:
        """Vocabulary from the captions of one split (train: val/test words stay unknown)."""
        return Vocabulary.build((c for n in self.splits[split] for c in self.captions[n]), min_freq=min_freq)

    def caption_table(self, split: str, vocab: Vocabulary, max_len: int | None = None) -> CaptionTable:
        return CaptionTable(self.splits[split], self.captions, vocab, max_len=max_len)


def _layout_error(root: Path, problem: str) -> DatasetNotFoundError:
    hints = []
    if (root / "captions.txt").is_file():
        hints.append(f"found {root / 'captions.txt'} (the Kaggle CSV format): "
                     f"convert it to {TOKEN_FILE} lines 'IMAGE#N<TAB>caption'")
    for alt in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images"):
        if (root / alt).is_dir() and not (root / IMAGES_DIR).is_dir():
            hints.append(f"found {root / alt}/: rename or symlink it to {root / IMAGES_DIR}")
    msg = f"{problem}\n{_LAYOUT_HELP.format(root=root)}"
    return DatasetNotFoundError(msg + "".join(f"\nhint: {h}" for h in hints))


def load_flickr8k(root: str | os.PathLike[str], karpathy_json: str | os.PathLike[str] | None = None,
                  seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1) -> Flickr8k:
    """Load captions and splits of ``root`` (see the module docstring for the layout).

    Captions whose image file is missing are dropped with a warning (the real
    ``Flickr8k.token.txt`` names one such image, ``2258277193_586949ec62.jpg.1``).
    """
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(root, f"dataset directory {root} does not exist")
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir():
        raise _layout_error(root, f"no {IMAGES_DIR}/ folder in {root}")

    if karpathy_json is not None:
        kpath = Path(karpathy_json)
        if not kpath.is_file():
            raise DatasetNotFoundError(f"Karpathy split file {kpath} does not exist")
        captions, splits = load_karpathy_json(kpath)
    else:
        token = root / TOKEN_FILE
        if not token.is_file():
            raise _layout_error(root, f"no caption file {token}")
        captions, splits = parse_token_file(token), None

    on_disk = {e.name for e in os.scandir(images_dir) if e.is_file()}  # one listing, not 8k stats
    missing = [n for n in captions if n not in on_disk]
    if missing:
        warnings.warn(f"{len(missing)} captioned image(s) missing from {images_dir} are ignored, "
                      f"e.g. {missing[:3]}", stacklevel=2)
        captions = {n: c for n, c in captions.items() if n in on_disk}
    if not captions:
        raise DataFormatError(f"none of the captioned images exists in {images_dir}")

    if splits is None:
        splits = make_splits(captions, root, seed=seed, val_frac=val_frac, test_frac=test_frac)
    else:
        splits = Splits(*([n for n in splits[s] if n in captions] for s in SPLIT_NAMES))
    return Flickr8k(root, images_dir, captions, splits, missing)


# --------------------------------------------------------------------------------------------
# Captions as tensors
# --------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def caption_choice(seed: int, epoch: int, index: int, count: int) -> int:
    """Which of an image's ``count`` captions is used at ``epoch``: a hash of (seed, epoch, index).

    Pure function of its arguments, so every rank, worker and loader (torch or DALI) agrees,
    and the choice does not depend on batch composition or sampling order.
    """
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64))
    return h % count


class CaptionTable:
    """All captions of ``names`` encoded once, padded with ``vocab.pad_id``.

    ``tokens``  int64 [N, K, T]  (K = most captions of any image, T = longest caption)
    ``lengths`` int64 [N, K]     tokens incl. <start>/<end>; 0 for empty slots
    ``counts``  int64 [N]        captions per image (need not be 5)
    Row ``i`` is image ``names[i]``: the datasets below use the same indices.
    """

    def __init__(self, names: Sequence[str], captions: Mapping[str, Sequence[str]], vocab: Vocabulary,
                 max_len: int | None = None) -> None:
        """``max_len`` caps a caption's length incl. <start>/<end> (longer ones keep their <end>)."""
        self.names = list(names)
        if not self.names:
            raise ValueError("CaptionTable needs at least one image")
        self.max_len = max_len
        encoded: list[list[list[int]]] = []
        self._references: list[list[list[str]]] = []
        for name in self.names:
            caps = captions[name]
            if not caps:
                raise ValueError(f"image {name!r} has no captions")
            toks = [tokenize(c) for c in caps]
            self._references.append(toks)  # full, untruncated words: metrics compare against these
            encoded.append([vocab.encode_tokens(t, max_len=max_len) for t in toks])
        k = max(len(e) for e in encoded)
        t = max(len(c) for e in encoded for c in e)
        tokens = np.full((len(encoded), k, t), vocab.pad_id, dtype=np.int64)
        lengths = np.zeros((len(encoded), k), dtype=np.int64)
        for i, caps_ids in enumerate(encoded):  # numpy slice writes: far cheaper than per-caption tensors
            for j, ids in enumerate(caps_ids):
                tokens[i, j, : len(ids)] = ids
                lengths[i, j] = len(ids)
        self.tokens = torch.from_numpy(tokens)  # (N, K, T)
        self.lengths = torch.from_numpy(lengths)  # (N, K)
        self.counts = torch.tensor([len(e) for e in encoded], dtype=torch.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.names)

    def choices(self, indices: Tensor | Sequence[int], epoch: int, seed: int) -> Tensor:
        """Caption slot chosen for each image index (see :func:`caption_choice`)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).tolist()
        counts = self.counts.tolist()
        return torch.tensor([caption_choice(seed, epoch, i, counts[i]) for i in idx], dtype=torch.int64)

    def sample(self, indices: Tensor | Sequence[int], epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """One caption per image: ``(captions int64 [B, T'], lengths int64 [B])``, T' = longest in batch.

        Returned on the CPU whatever the device of ``indices``.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        slot = self.choices(idx, epoch, seed)
        lengths = self.lengths[idx, slot]  # (B,)
        captions = self.tokens[idx, slot, : int(lengths.max())]  # (B, T')
        return captions.contiguous(), lengths

    def references(self, i: int) -> list[list[str]]:
        """Tokenized reference captions of image ``i`` (untruncated, unknown words kept)."""
        return self._references[i]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a 16-bit / 32-bit integer or float single-channel array to 0..255."""
    a = arr.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a / 257.0  # full 16-bit range -> 8-bit
    elif mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0  # float image in [0, 1]
    elif lo >= 0 and hi <= 255:
        pass  # already 8-bit values
    elif mode == "I" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 16-bit data held in a 32-bit mode (older Pillow opens 16-bit PNGs as "I")
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)  # stretch the range
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (always returns a new image).

    - alpha (RGBA, LA, PA, P with transparency, RGBa, La): composited onto WHITE, like a viewer
      on a white page (transparent regions of logos/drawings are usually meant as background);
    - 16/32-bit and float grey (I;16*, I, F): scaled to 0..255 (see ``_to_uint8``), then grey->RGB;
    - everything else (1, L, P, CMYK, YCbCr, HSV, ...): ``Image.convert("RGB")``.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "La":  # premultiplied grey+alpha (some TIFFs): Pillow converts it to LA only
        img, mode = img.convert("LA"), "LA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")  # 2-D uint8 -> "L"
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str], exif_transpose: bool = True) -> Image.Image:
    """Decode ``path`` fully and return an RGB image; any failure raises :class:`ImageLoadError`.

    Truncated files fail here (``LOAD_TRUNCATED_IMAGES`` stays off): a half-grey training image
    is worse than a clear error. EXIF orientation is applied by default, as DALI's
    ``decoders.image`` does (``adjust_orientation=True``), so both loaders see the same pixels.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, inside the try, so truncation/corruption is caught here
            if exif_transpose and im.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such image file") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e


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
        if img.mode != "RGB":
            img = to_rgb(img)
        r, s = self.resize_size, self.image_size
        img = img.resize((r, r), Image.Resampling.BILINEAR)
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


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
class _ImageDataset(Dataset):
    def __init__(self, images_dir: str | os.PathLike[str], names: Sequence[str],
                 transform: Callable[[Image.Image], Tensor]) -> None:
        self.images_dir = Path(images_dir)
        self.names = list(names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.names)

    def path(self, i: int) -> Path:
        return self.images_dir / self.names[i]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.path(i))), i


class TrainDataset(_ImageDataset):
    """One sample per image: ``(image float32 [3, S, S], index)``.

    Captions are attached per batch by :func:`collate_train` (``index`` = row of the
    :class:`CaptionTable` built from the same ``names``).
    """

    @classmethod
    def from_flickr8k(cls, data: Flickr8k, image_size: int, split: str = "train",
                      hflip: bool = False) -> TrainDataset:
        return cls(data.images_dir, data.splits[split], image_transform(image_size, train=True, hflip=hflip))


class EvalDataset(_ImageDataset):
    """``(image float32 [3, S, S], index)`` with the deterministic eval transform.

    ``references(i)`` returns the tokenized reference captions when a ``table`` is given.
    """

    def __init__(self, images_dir: str | os.PathLike[str], names: Sequence[str],
                 transform: Callable[[Image.Image], Tensor], table: CaptionTable | None = None) -> None:
        super().__init__(images_dir, names, transform)
        if table is not None and table.names != self.names:
            raise ValueError("EvalDataset and its CaptionTable must be built from the same image names")
        self.table = table

    @classmethod
    def from_flickr8k(cls, data: Flickr8k, image_size: int, split: str = "val",
                      table: CaptionTable | None = None) -> EvalDataset:
        return cls(data.images_dir, data.splits[split], image_transform(image_size, train=False), table)

    def references(self, i: int) -> list[list[str]]:
        if self.table is None:
            raise RuntimeError("EvalDataset was built without a CaptionTable")
        return self.table.references(i)


def collate_train(batch: Sequence[tuple[Tensor, int]] | tuple[Tensor, Tensor], table: CaptionTable,
                  epoch: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(images [B,3,S,S], captions int64 [B,T], lengths int64 [B])`` from a batch of ``(image, index)``.

    ``batch`` is either the list of samples (use as ``collate_fn`` via ``functools.partial``)
    or an already collated ``(images, indices)`` pair from a default DataLoader - the latter lets
    the training loop pass the current epoch without rebuilding worker processes.
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Tensor) \
            and isinstance(batch[1], Tensor) and batch[0].dim() == 4:
        images, indices = batch
    else:
        images = torch.stack([b[0] for b in batch])
        indices = torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)
    captions, lengths = table.sample(indices, epoch=epoch, seed=seed)
    return images, captions, lengths


# --------------------------------------------------------------------------------------------
# CLI: subcommands register themselves in build_parser(); add yours with a `add_<name>_command`.
# --------------------------------------------------------------------------------------------
def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", type=Path, help="dataset root (Images/ + Flickr8k.token.txt)")
    p.add_argument("--karpathy-json", type=Path, default=None, help="take captions and splits from this file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (no official split files)")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of images in val (random split)")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of images in test (random split)")


def load_from_args(args: argparse.Namespace) -> Flickr8k:
    """:func:`load_flickr8k` from the arguments added by ``add_dataset_args``."""
    return load_flickr8k(args.data_dir, karpathy_json=args.karpathy_json, seed=args.seed,
                         val_frac=args.val_frac, test_frac=args.test_frac)


def cmd_info(args: argparse.Namespace) -> int:
    data = load_from_args(args)
    vocab = data.build_vocab(min_freq=args.min_freq)
    n_files = sum(1 for e in os.scandir(data.images_dir) if e.is_file())
    per_image = [len(c) for c in data.captions.values()]
    lengths = [len(tokenize(c)) for caps in data.captions.values() for c in caps]
    sizes = data.splits.sizes()
    print(f"dataset        {data.root}")
    print(f"image files    {n_files} in {data.images_dir}")
    print(f"captioned      {len(data.captions)} images, {data.num_captions} captions "
          f"({min(per_image)}-{max(per_image)} per image), "
          f"{len(data.missing_images)} captioned images missing")
    print(f"caption words  mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")
    print(f"splits         train {sizes['train']}, val {sizes['val']}, test {sizes['test']}")
    print(f"vocabulary     {len(vocab)} entries incl. 4 specials (train split, min_freq={args.min_freq})")
    return 0


def add_info_command(sub: Any) -> None:
    p = sub.add_parser("info", help="print counts of images, captions, splits and vocabulary size")
    add_dataset_args(p)
    p.add_argument("--min-freq", type=int, default=1, help="vocabulary minimum word frequency")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.data", description="Inspect a Flickr8k-layout dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_info_command(sub)
    from core.datacheck import add_check_command  # late import: datacheck imports this module

    add_check_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataFormatError, DatasetNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
