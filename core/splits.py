"""Train/val/test splits of a dataset: official split files, Karpathy's JSON, or a seeded random split.

Each image is in exactly one split; a split is a list of image names. Used by core.data when it loads
a dataset directory. Imports no torch.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.captions import (IMAGES_DIR, OFFICIAL_SPLIT_FILES, TOKEN_FILE, DataFormatError, read_text_lines,
                           refuse_escaping, shown_name)
from core.fileio import read_json

SPLIT_NAMES = ("train", "val", "test")


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


@dataclass
class Karpathy:
    """What a Karpathy ``dataset_*.json`` holds: captions and splits by image name, and each image's id."""

    captions: dict[str, list[str]]
    splits: Splits
    ids: dict[str, int | str]  # name -> cocoid (COCO) or imgid: the image_id of results files
    dataset: str  # the file's own "dataset" field ("" when absent)


def _karpathy_field(img: Any, key: str, kind: type, where: str) -> Any:
    value = img.get(key) if isinstance(img, dict) else None
    if not isinstance(value, kind):
        found = "missing" if not isinstance(img, dict) or key not in img else f"a {type(value).__name__}"
        raise DataFormatError(f"{where}.{key}: expected a {kind.__name__}, found {found}")
    return value


def _karpathy_raws(img: dict, where: str) -> list[str]:
    sentences = _karpathy_field(img, "sentences", list, where)
    raws = []
    for j, s in enumerate(sentences):
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str):  # "tokens" are not read: captions are tokenized like every other source
            raise DataFormatError(f"{where}.sentences[{j}].raw: expected a string, found "
                                  f"{'missing' if not isinstance(s, dict) or 'raw' not in s else type(raw).__name__}")
        if raw.strip():
            raws.append(raw.strip())
    if not raws:
        raise DataFormatError(f"{where}.sentences: image has no captions")
    return raws


def read_karpathy(path: str | os.PathLike[str], use_filepath: bool) -> Karpathy:
    """Read Karpathy's ``dataset_flickr8k.json`` / ``dataset_flickr30k.json`` / ``dataset_coco.json``.

    Reads ``images[].filename``, ``images[].split``, ``images[].sentences[].raw`` and, with ``use_filepath``
    (COCO: ``train2014``/``val2014``), ``images[].filepath``: the name is then ``filepath/filename``. ``restval``
    images go to train (the usual practice). Errors name the file and the field (``images[12].sentences[0].raw``).
    """
    path = Path(path)
    data = read_json(path, DataFormatError)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataFormatError(f"{path}: expected a JSON object with an 'images' list")
    captions: dict[str, list[str]] = {}
    ids: dict[str, int | str] = {}
    split_lists: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for i, img in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        name = _karpathy_field(img, "filename", str, where)
        if use_filepath:
            name = f"{_karpathy_field(img, 'filepath', str, where).strip('/')}/{name}"
        refuse_escaping(name, f"{where}.filename: ")  # before anything is opened, whatever the skip list says
        split = _karpathy_field(img, "split", str, where)
        split = "train" if split == "restval" else split
        if split not in split_lists:
            raise DataFormatError(f"{where}.split: unknown split {img['split']!r} (expected train/val/test/restval)")
        if name in captions:
            raise DataFormatError(f"{where}.filename: image {shown_name(name)} listed twice")
        captions[name] = _karpathy_raws(img, where)
        ids[name] = img.get("cocoid", img.get("imgid", name))
        split_lists[split].append(name)
    if not captions:
        raise DataFormatError(f"{path}: 'images' is empty")
    return Karpathy(captions, Splits(**split_lists), ids, str(data.get("dataset", "")))


def read_official_splits(data_dir: str | os.PathLike[str], known: Iterable[str]) -> Splits:
    """Read ``Flickr_8k.{train,dev,test}Images.txt``; every name must be in ``known``."""
    data_dir = Path(data_dir)
    known = set(known)
    lists: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split, fname in OFFICIAL_SPLIT_FILES.items():
        path = data_dir / fname
        names: list[str] = []
        for lineno, line in read_text_lines(path):
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
