"""Dataset layouts on disk: Flickr8k, Flickr30k and COCO (Karpathy's splits), chosen by name or from the files present.

One reader class per layout behind one factory: ``create_reader(dataset, root, karpathy_json).read()`` gives a
:class:`Layout` (``dataset`` auto: from the files present).

    flickr8k   DIR/Images/*.jpg + DIR/Flickr8k.token.txt        (or --karpathy-json dataset_flickr8k.json)
    flickr30k  DIR/dataset_flickr30k.json + DIR/flickr30k-images/*.jpg (or DIR/Images/)
    coco       DIR/dataset_coco.json + DIR/train2014/*.jpg + DIR/val2014/*.jpg  (image = filepath/filename)

Nothing here opens an image: which captioned images exist is decided from one directory listing per image folder
(COCO: 123k images, two listings). A name that leads outside its image folder (absolute, '..', a symbolic link out
of the folder) is refused by name before anything is opened (core.captions.resolve_inside). Imports no torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from core.captions import (COCO_IMAGE_DIRS, FLICKR30K_IMAGE_DIRS, IMAGES_DIR, KARPATHY_FILES, TOKEN_FILE,
                           OutsideRootError, parse_token_file, resolve_inside, shown_name)
from core.skiplist import is_regular_entry
from core.splits import Karpathy, Splits, read_karpathy

DATASETS = ("flickr8k", "flickr30k", "coco")
EXPECTED = {
    "flickr8k": "  {root}/Images/*.jpg\n  {root}/Flickr8k.token.txt   (lines 'IMAGE.jpg#N<TAB>caption'; or "
                "--karpathy-json dataset_flickr8k.json)\n"
                "make a synthetic one: `python -m core.synthetic {root} --layout flickr8k` (or `./launch.sh demo`)",
    "flickr30k": "  {root}/dataset_flickr30k.json   (Karpathy's: images[].filename, split, sentences[].raw)\n"
                 "  {root}/flickr30k-images/*.jpg   (or {root}/Images/)\n"
                 "make a synthetic one: `python -m core.synthetic {root} --layout flickr30k`",
    "coco": "  {root}/dataset_coco.json   (Karpathy's: images[].filepath, filename, split incl. restval, "
            "sentences[].raw)\n  {root}/train2014/*.jpg  {root}/val2014/*.jpg\n"
            "make a synthetic one: `python -m core.synthetic {root} --layout coco`",
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset directory, its image folder or its caption file is missing."""


@dataclass
class Layout:
    """Captions by image name (a path relative to ``images_dir``), the file's splits if it has them, image ids."""

    dataset: str
    images_dir: Path
    captions: dict[str, list[str]]
    splits: Splits | None
    ids: dict[str, int | str] = field(default_factory=dict)
    anchors: tuple[str, ...] = ()  # first components that may be links placed at the root (COCO's folders)


def expected_layout(dataset: str, root: Path) -> str:
    return f"expected layout ({dataset}):\n" + EXPECTED[dataset].format(root=root)


def layout_error(root: Path, problem: str, dataset: str | None = None) -> DatasetNotFoundError:
    names = [dataset] if dataset else list(DATASETS)
    hints = []
    if (root / "captions.txt").is_file():
        hints.append(f"found {root / 'captions.txt'} (the Kaggle CSV format): "
                     f"convert it to {TOKEN_FILE} lines 'IMAGE#N<TAB>caption'")
    for alt in ("Flicker8k_Dataset", "Flickr8k_Dataset", "images"):
        if (root / alt).is_dir() and not (root / IMAGES_DIR).is_dir():
            hints.append(f"found {root / alt}/: rename or symlink it to {root / IMAGES_DIR}")
    text = "\n".join(expected_layout(d, root) for d in names)
    return DatasetNotFoundError(f"{problem}\n{text}" + "".join(f"\nhint: {h}" for h in hints))


def detect(root: Path, karpathy_json: Path | None = None) -> str:
    """The dataset whose files are in ``root`` (a Karpathy file given by name decides by its name)."""
    if karpathy_json is not None:
        for name, fname in KARPATHY_FILES.items():
            if Path(karpathy_json).name == fname:
                return name
        return "flickr8k"  # any other name: the Flickr8k layout with the file's captions, as before
    found = [d for d in ("coco", "flickr30k") if (root / KARPATHY_FILES[d]).is_file()]
    if (root / TOKEN_FILE).is_file() or ((root / KARPATHY_FILES["flickr8k"]).is_file() and not found):
        found.append("flickr8k")
    if len(found) == 1:
        return found[0]
    if not found:
        raise layout_error(root, f"found no dataset in {root} (none of {TOKEN_FILE}, "
                                 f"{', '.join(KARPATHY_FILES.values())})")
    raise layout_error(root, f"{root} holds the files of several datasets ({', '.join(found)}): "
                             f"choose one with --dataset", dataset=found[0])


class LayoutReader:
    """Reads the captions (and splits, from a Karpathy file) of one dataset layout in ``root``; made by
    :func:`create_reader`. ``karpathy_json`` replaces the layout's own Karpathy file."""

    dataset: ClassVar[str]

    def __init__(self, root: Path, karpathy_json: Path | None = None) -> None:
        self.root = root
        self.karpathy_json = karpathy_json

    def read(self) -> Layout:
        raise NotImplementedError

    def _karpathy(self, use_filepath: bool) -> Karpathy:
        path = self.karpathy_json if self.karpathy_json is not None else self.root / KARPATHY_FILES[self.dataset]
        if not path.is_file():
            raise layout_error(self.root, f"Karpathy split file {path} does not exist", self.dataset)
        return read_karpathy(path, use_filepath=use_filepath)


class Flickr8kReader(LayoutReader):
    """DIR/Images/ + DIR/Flickr8k.token.txt, or a Karpathy file (``karpathy_json``, or dataset_flickr8k.json where
    the token file is absent)."""

    dataset = "flickr8k"

    def reads_token_file(self) -> bool:
        """Whether the captions come from Flickr8k.token.txt (else from a Karpathy file)."""
        root = self.root
        return self.karpathy_json is None and ((root / TOKEN_FILE).is_file()
                                               or not (root / KARPATHY_FILES["flickr8k"]).is_file())

    def read(self) -> Layout:
        images_dir = self.root / IMAGES_DIR
        if not images_dir.is_dir():
            raise layout_error(self.root, f"no {IMAGES_DIR}/ folder in {self.root}", self.dataset)
        if not self.reads_token_file():
            k = self._karpathy(use_filepath=False)
            return Layout(self.dataset, images_dir, k.captions, k.splits, k.ids)
        token = self.root / TOKEN_FILE
        if not token.is_file():
            raise layout_error(self.root, f"no caption file {token}", self.dataset)
        return Layout(self.dataset, images_dir, parse_token_file(token), None)


class Flickr30kReader(LayoutReader):
    """DIR/dataset_flickr30k.json + DIR/flickr30k-images/ (or DIR/Images/)."""

    dataset = "flickr30k"

    def read(self) -> Layout:
        folder = next((self.root / d for d in FLICKR30K_IMAGE_DIRS if (self.root / d).is_dir()), None)
        if folder is None:
            folders = " or ".join(d + "/" for d in FLICKR30K_IMAGE_DIRS)
            raise layout_error(self.root, f"no image folder ({folders}) in {self.root}", self.dataset)
        k = self._karpathy(use_filepath=False)
        return Layout(self.dataset, folder, k.captions, k.splits, k.ids)


class CocoReader(LayoutReader):
    """DIR/dataset_coco.json + DIR/train2014/ + DIR/val2014/; an image's name is its filepath/filename."""

    dataset = "coco"

    def read(self) -> Layout:
        if not any((self.root / d).is_dir() for d in COCO_IMAGE_DIRS):
            folders = " or ".join(d + "/" for d in COCO_IMAGE_DIRS)
            raise layout_error(self.root, f"no image folder ({folders}) in {self.root}", self.dataset)
        k = self._karpathy(use_filepath=True)
        return Layout(self.dataset, self.root, k.captions, k.splits, k.ids, anchors=COCO_IMAGE_DIRS)


READERS: dict[str, type[LayoutReader]] = {r.dataset: r for r in (Flickr8kReader, Flickr30kReader, CocoReader)}


def create_reader(dataset: str, root: str | os.PathLike[str],
                  karpathy_json: str | os.PathLike[str] | None = None) -> LayoutReader:
    """The reader of the dataset in ``root``: ``dataset`` is one of :data:`DATASETS`, or auto (:func:`detect`).

        layout = create_reader("auto", root).read()
    """
    root = Path(root)
    kpath = Path(karpathy_json) if karpathy_json is not None else None
    if dataset not in ("auto", *DATASETS):
        raise ValueError(f"--dataset must be auto or one of {DATASETS}, got {dataset!r}")
    if not root.is_dir():
        raise layout_error(root, f"dataset directory {root} does not exist",
                           None if dataset == "auto" else dataset)
    if dataset == "auto":
        dataset = detect(root, kpath)
    return READERS[dataset](root, kpath)


def files_present(images_dir: Path, names: list[str], anchors: tuple[str, ...] = ()) -> set[str]:
    """The ``names`` (paths relative to ``images_dir``) that are files: one listing per folder, no stat per image.

    Each folder, and each listed entry that is a symbolic link, must resolve inside ``images_dir``
    (:func:`core.captions.resolve_inside`): otherwise OutsideRootError names the image, and nothing is opened.
    """
    folders: dict[str, str] = {}
    for n in names:
        folders.setdefault(os.path.dirname(n), n)  # folder -> an image named in it (named in a refusal)
    wanted = set(names)
    present: set[str] = set()
    for folder, example in folders.items():
        if folder:
            _inside(images_dir, folder, example, anchors)
        path = images_dir / folder
        if path.is_dir():
            prefix = f"{folder}/" if folder else ""
            for e in os.scandir(path):
                name = prefix + e.name
                if name in wanted and is_regular_entry(e):  # a loop: not a file
                    if e.is_symlink():
                        _inside(images_dir, name, name, anchors)
                    present.add(name)
    return present


def _inside(images_dir: Path, path: str, name: str, anchors: tuple[str, ...]) -> None:
    """``path`` (image ``name``, or its folder) resolves inside ``images_dir``; the refusal names the image."""
    try:
        resolve_inside(images_dir, path, anchors)
    except OutsideRootError:
        if path == name:
            raise
        raise OutsideRootError(f"image name {shown_name(name)} leads out of the image folder {images_dir}/ "
                               f"through its folder {shown_name(path)}, a symbolic link: refusing names outside "
                               "the image folder") from None


def add_dataset_args(p: argparse.ArgumentParser, data_flag: str | None = None, splits: bool = True) -> None:
    """The flags that name a dataset, its layout and (``splits``) its split, the same in every command (torch-free).

    The directory is the positional DATA_DIR, or the required option ``data_flag`` (e.g. ``"--data"``); either
    way it lands in ``args.data_dir``. ``core.data.load_from_args`` loads what they name.
    """
    where = "dataset root (layouts: python -m core.layouts, or docs/data.md)"
    if data_flag:
        p.add_argument(data_flag, dest="data_dir", type=Path, required=True, help=where)
    else:
        p.add_argument("data_dir", type=Path, help=where)
    p.add_argument("--dataset", choices=("auto", *DATASETS), default="auto",
                   help="the dataset's layout; auto: from the files present (default)")
    p.add_argument("--karpathy-json", type=Path, default=None, help="take captions and splits from this file")
    if not splits:
        return
    p.add_argument("--split-seed", type=int, default=0, help="seed of the random split, as in training (default 0)")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of images in val (random split)")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of images in test (random split)")
