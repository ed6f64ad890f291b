"""The skip list: the images ``python -m core.data check`` found unusable, tied to one dataset listing.

A JSON file (default ``DATA_DIR/skip_list.json``) written by core.datacheck and read by training on every
rank (:func:`read_skip_list`, then ``core.data.apply_skip_list``). Its listing hash makes a list made for
another version of the dataset refused rather than silently applied.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from core.captions import COCO_IMAGE_DIRS, FLICKR30K_IMAGE_DIRS, IMAGES_DIR, KARPATHY_FILES, TOKEN_FILE
from core.fileio import sha256_file

SKIP_LIST_NAME = "skip_list.json"
SKIP_LIST_FORMAT = "sat-captioning skip list"
SKIP_LIST_VERSION = 1


class SkipListError(ValueError):
    """A skip list is unreadable, of another format, or was made for another dataset listing."""


def is_regular_entry(entry: os.DirEntry) -> bool:
    """``entry.is_file()``, False where it raises (a symlink loop: ELOOP) instead of stopping the whole listing."""
    try:
        return entry.is_file()
    except OSError:
        return False


def dataset_listing_hash(root: str | os.PathLike[str]) -> str:
    """sha256 over the caption files' bytes and the (name, size) of every non-hidden file in the image folders.

    Caption files: Flickr8k.token.txt and Karpathy's dataset_*.json; image folders: those of every layout
    (core.layouts: Images/, flickr30k-images/, train2014/, val2014/), where present. Sizes, not times or
    contents: a copy of the dataset on another node has the same hash, and hashing 8,000 images costs one
    directory listing. Hidden files (.DS_Store, ._x.jpg) that copy tools add or drop do not count.
    """
    root = Path(root)
    h = hashlib.sha256()
    for name in (TOKEN_FILE, *KARPATHY_FILES.values()):
        if (root / name).is_file():
            h.update(f"{name}\t{sha256_file(root / name)}\n".encode())
    for folder in dict.fromkeys((IMAGES_DIR, *FLICKR30K_IMAGE_DIRS, *COCO_IMAGE_DIRS)):  # ordered, no repeats
        if (root / folder).is_dir():
            entries = sorted((e.name, e.stat().st_size) for e in os.scandir(root / folder)
                             if is_regular_entry(e) and not e.name.startswith("."))
            for name, size in entries:
                h.update(f"{folder}/{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class SkipList:
    skip: dict[str, str]  # image name -> reason
    bad_lines: list[int]  # caption-file line numbers that do not parse
    listing_hash: str

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.skip)


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
