"""Captioning datasets: captions and splits of a dataset directory, caption tensors, torch datasets.

Layouts (Flickr8k's token file, Karpathy's dataset_flickr8k/flickr30k/coco.json; the real datasets or ones made
by ``python -m core.synthetic DIR --layout ...``): see core.layouts. Images are read by core.images (the one
loader, only when a sample is asked for), caption files by core.captions, splits made by core.splits.

Captions and images travel separately: a dataset yields ``(image, index)`` and the batch's
captions are looked up with :meth:`CaptionTable.sample`, one rule for the torch and DALI loaders.

    python -m core.data info DATA_DIR          counts of images, captions, splits, vocabulary
    python -m core.data check DATA_DIR         every image and caption line checked (core.datacheck)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from core.captions import DataFormatError, refuse_escaping
from core.cli import run_main
from core.datacheck import add_check_command
from core.images import image_transform, load_image
from core.layouts import DatasetNotFoundError, add_dataset_args, create_reader, files_present
from core.skiplist import SkipList
from core.splits import SPLIT_NAMES, Splits, make_splits
from core.vocab import Vocabulary, tokenize

# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------
def checked_path(images_dir: Path, name: str) -> Path:
    """``images_dir / name`` for a name that stays below the folder by itself (no absolute path, no '..'); links
    out of the folder were refused when the dataset was loaded (core.layouts.files_present)."""
    refuse_escaping(name, f"{images_dir}/: ")
    return images_dir / name


@dataclass
class CaptionDataset:
    """Captions and splits of a dataset directory. Only images present in ``images_dir`` are kept."""

    root: Path
    images_dir: Path
    captions: dict[str, list[str]]
    splits: Splits
    missing_images: list[str] = field(default_factory=list)  # captioned but absent from the image folder
    dataset: str = "flickr8k"  # flickr8k | flickr30k | coco (core.layouts)
    ids: dict[str, int | str] = field(default_factory=dict)  # name -> Karpathy image id (cocoid/imgid), if any

    def image_path(self, name: str) -> Path:
        """The file of image ``name``; a name leading out of the image folder is refused (loading checked them all
        on disk; this guards names given afterwards)."""
        return checked_path(self.images_dir, name)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions.values())

    def build_vocab(self, min_freq: int = 1, split: str = "train") -> Vocabulary:
        """Vocabulary from the captions of one split (train: val/test words stay unknown)."""
        return Vocabulary.build((c for n in self.splits[split] for c in self.captions[n]), min_freq=min_freq)

    def caption_table(self, split: str, vocab: Vocabulary, max_len: int | None = None) -> CaptionTable:
        return CaptionTable(self.splits[split], self.captions, vocab, max_len=max_len)

    def eval_images(self, names: Sequence[str], image_size: int) -> Tensor:
        """(N, 3, S, S) evaluation inputs of ``names``: decoded, resized and normalized, no augmentation."""
        transform = image_transform(image_size, train=False)
        return torch.stack([transform(load_image(self.image_path(n))) for n in names])

    def tokenized_references(self, names: Sequence[str]) -> list[list[list[str]]]:
        """Each image's reference captions as word lists (what BLEU and the caption checks compare with)."""
        return [[tokenize(c) for c in self.captions[n]] for n in names]


def load_dataset(root: str | os.PathLike[str], karpathy_json: str | os.PathLike[str] | None = None,
                 seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.1, dataset: str = "auto") -> CaptionDataset:
    """Load captions and splits of the dataset in ``root`` (Flickr8k, Flickr30k or COCO: see core.layouts).

    No image is opened. Captions whose image file is missing are dropped with a warning (the real
    ``Flickr8k.token.txt`` names one such image, ``2258277193_586949ec62.jpg.1``).
    """
    layout = create_reader(dataset, root, karpathy_json).read()
    captions, splits = layout.captions, layout.splits
    on_disk = files_present(layout.images_dir, list(captions), layout.anchors)  # one listing per folder, not 123k stats
    missing = [n for n in captions if n not in on_disk]
    if missing:
        warnings.warn(f"{len(missing)} captioned image(s) missing from {layout.images_dir} are ignored, "
                      f"e.g. {missing[:3]}", stacklevel=2)
        captions = {n: c for n, c in captions.items() if n in on_disk}
    if not captions:
        raise DataFormatError(f"none of the captioned images exists in {layout.images_dir}")

    if splits is None:
        splits = make_splits(captions, root, seed=seed, val_frac=val_frac, test_frac=test_frac)
    else:
        splits = Splits(*([n for n in splits[s] if n in captions] for s in SPLIT_NAMES))
    return CaptionDataset(Path(root), layout.images_dir, captions, splits, missing, layout.dataset, layout.ids)


def apply_skip_list(data: CaptionDataset, skip: SkipList | Iterable[str]) -> CaptionDataset:
    """``data`` without the skipped images (from ``python -m core.data check``), splits otherwise unchanged.

    Filtering after splitting keeps every other image in its split, and the result depends only on the
    dataset and the skip list, so every rank computes the same.
    """
    names = skip.names if isinstance(skip, SkipList) else frozenset(skip)
    captions = {n: c for n, c in data.captions.items() if n not in names}
    splits = Splits(*([n for n in data.splits[s] if n not in names] for s in SPLIT_NAMES))
    return replace(data, captions=captions, splits=splits)


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

    def sample(self, indices: Tensor | Sequence[int], epoch: int, seed: int, k: int = 1) -> tuple[Tensor, Tensor]:
        """``k`` captions per image: ``(captions int64 [B*k, T'], lengths int64 [B*k])``, image-major, T' = longest.

        The first is the epoch's choice (:meth:`choices`), the others the image's next captions in order,
        wrapping around when it has fewer than ``k``. Returned on the CPU whatever the device of ``indices``.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        start = self.choices(idx, epoch, seed)  # (B,)
        slots = (start[:, None] + torch.arange(k)[None, :]) % self.counts[idx][:, None]  # (B, k)
        rows = idx[:, None].expand(-1, k)
        lengths = self.lengths[rows, slots].reshape(-1)  # (B*k,)
        captions = self.tokens[rows, slots, : int(lengths.max())].reshape(lengths.shape[0], -1)  # (B*k, T')
        return captions.contiguous(), lengths

    def references(self, i: int) -> list[list[str]]:
        """Tokenized reference captions of image ``i`` (untruncated, unknown words kept)."""
        return self._references[i]


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
        return checked_path(self.images_dir, self.names[i])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(load_image(self.path(i))), i


class TrainDataset(_ImageDataset):
    """One sample per image: ``(image float32 [3, S, S], index)``.

    Captions are attached per batch by ``CaptionTable.sample(indices, epoch, seed)`` (``index`` = row of the
    :class:`CaptionTable` built from the same ``names``).
    """


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

    def references(self, i: int) -> list[list[str]]:
        if self.table is None:
            raise RuntimeError("EvalDataset was built without a CaptionTable")
        return self.table.references(i)


# --------------------------------------------------------------------------------------------
# CLI: subcommands register themselves in build_parser(); add yours with a `add_<name>_command`.
# --------------------------------------------------------------------------------------------
def load_from_args(args: argparse.Namespace) -> CaptionDataset:
    """:func:`load_dataset` from the arguments added by ``add_dataset_args``."""
    return load_dataset(args.data_dir, karpathy_json=args.karpathy_json, seed=args.split_seed,
                         val_frac=args.val_frac, test_frac=args.test_frac, dataset=getattr(args, "dataset", "auto"))


def cmd_info(args: argparse.Namespace) -> int:
    data = load_from_args(args)
    vocab = data.build_vocab(min_freq=args.min_word_freq)
    per_image = [len(c) for c in data.captions.values()]
    lengths = [len(tokenize(c)) for caps in data.captions.values() for c in caps]
    sizes = data.splits.sizes()
    print(f"dataset        {data.root}")
    print(f"layout         {data.dataset}, images under {data.images_dir}")
    print(f"captioned      {len(data.captions)} images, {data.num_captions} captions "
          f"({min(per_image)}-{max(per_image)} per image), "
          f"{len(data.missing_images)} captioned images missing")
    print(f"caption words  mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")
    print(f"splits         train {sizes['train']}, val {sizes['val']}, test {sizes['test']}")
    print(f"vocabulary     {len(vocab)} entries incl. 4 specials (train split, --min-word-freq {args.min_word_freq})")
    return 0


def add_info_command(sub: Any) -> None:
    p = sub.add_parser("info", help="print counts of images, captions, splits and vocabulary size")
    add_dataset_args(p)
    p.add_argument("--min-word-freq", type=int, default=5,
                   help="words seen fewer times in the train captions become <unk>, as in training (default 5)")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core.data",
                                     description="Inspect a captioning dataset (Flickr8k, Flickr30k or COCO layout).")
    sub = parser.add_subparsers(dest="command", required=True)
    add_info_command(sub)
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
    raise SystemExit(run_main(main))
