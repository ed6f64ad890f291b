"""Score a COCO-format results file against a dataset's references with the COCO caption metrics.

    python -m core.evaluate RESULTS.json --data DIR --split test [--dataset auto] [--json SCORES.json]

``RESULTS.json`` is ``[{"image_id": ..., "caption": "..."}, ...]`` (what ``python -m export.caption ...
--results-json FILE`` and training's ``test_results.json`` hold). ``image_id`` is the image's name in the dataset
(``00012.jpg``, COCO's ``val2014/COCO_val2014_....jpg``), its Karpathy id (``cocoid``/``imgid``) or its file stem.
Prints BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE (or why one is missing): core.cocoeval. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.captions import DataFormatError
from core.cli import run_main
from core.cocoeval import CocoEvalUnavailable, CocoScores, coco_caption_scores
from core.fileio import WriteError, atomic_write_text, read_json
from core.layouts import DatasetNotFoundError, add_dataset_args


def read_results(path: Path) -> list[tuple[Any, str]]:
    """``(image_id, caption)`` of each entry; DataFormatError names the file and the entry."""
    data = read_json(path, DataFormatError)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{\"image_id\": ..., \"caption\": ...}}, "
                              f"found a {type(data).__name__}")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry:
            raise DataFormatError(f"{path}: [{i}].image_id: missing")
        if not isinstance(entry.get("caption"), str):
            raise DataFormatError(f"{path}: [{i}].caption: expected a string, found "
                                  f"{type(entry.get('caption')).__name__ if 'caption' in entry else 'missing'}")
        out.append((entry["image_id"], entry["caption"]))
    if not out:
        raise DataFormatError(f"{path}: no results (empty list)")
    return out


def match_results(results: list[tuple[Any, str]], names: Sequence[str], ids: dict[str, Any],
                  path: Path, split: str) -> dict[str, str]:
    """``{image name: caption}``: each ``image_id`` resolved to one image of the split (name, id or stem)."""
    lookup: dict[str, str] = {}
    for name in names:  # least specific first: an exact name wins over a stem or an id
        lookup[Path(name).stem] = name
        if name in ids:
            lookup[str(ids[name])] = name
        lookup[name] = name
    captions: dict[str, str] = {}
    for i, (image_id, caption) in enumerate(results):
        name = lookup.get(str(image_id))
        if name is None:
            raise DataFormatError(f"{path}: [{i}].image_id {image_id!r} is not an image of the {split} split "
                                  f"({len(names)} images, e.g. {list(names[:2])})")
        if name in captions:
            raise DataFormatError(f"{path}: [{i}].image_id {image_id!r}: a second caption for {name!r}")
        captions[name] = caption
    return captions


def evaluate_captions(captions: dict[str, str], references: dict[str, list[str]], spice: bool = True) -> CocoScores:
    """The COCO caption metrics of ``captions`` (name -> caption) against ``references`` (name -> raw captions)."""
    return coco_caption_scores(captions, {n: references[n] for n in captions}, spice=spice)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help='COCO-format results: [{"image_id": ..., "caption": ...}]')
    add_dataset_args(p, data_flag="--data")  # its references are scored against
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="the split the results cover")
    p.add_argument("--no-spice", dest="spice", action="store_false", help="do not try SPICE (slow even offline)")
    p.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    return p


def run(args: argparse.Namespace) -> CocoScores:
    from core.data import load_from_args  # (imports torch: only when a dataset is read)

    t0 = time.perf_counter()
    results = read_results(args.results)  # a bad results file fails before the dataset is read
    data = load_from_args(args)
    names = data.splits[args.split]
    captions = match_results(results, names, data.ids, args.results, args.split)
    if len(captions) < len(names):
        print(f"note: the results cover {len(captions)} of the {len(names)} {args.split} images; "
              f"only those are scored", file=sys.stderr)
    scores = evaluate_captions(captions, data.captions, spice=args.spice)
    print(f"{args.results} against {data.dataset} {args.split} ({data.root}), {time.perf_counter() - t0:.1f}s")
    print(scores.table())
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({**scores.to_dict(), "split": args.split}, indent=1) + "\n")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DataFormatError, DatasetNotFoundError, CocoEvalUnavailable, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the results file or --json cannot be opened
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
