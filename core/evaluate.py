"""Score a COCO-format results file against a dataset's references with the COCO caption metrics.

    python -m core.evaluate RESULTS.json --data DIR --split test [--dataset auto] [--json SCORES.json]

``RESULTS.json`` is ``[{"image_id": ..., "caption": "..."}, ...]`` (what ``python -m export.caption ...
--results-json FILE`` and training's ``test_results.json`` hold). ``image_id`` is the image's name in the dataset
(``00012.jpg``, COCO's ``val2014/COCO_val2014_....jpg``), its Karpathy id (``cocoid``/``imgid``) or its file stem.
Prints BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE (or why one is missing): core.cocoeval. Imports no torch.
Exit 0 when scored (a metric whose tool is absent is said), 1 when a Java scorer broke (``METEOR failed: ...``;
the other metrics are still printed), 2 for a bad results file or dataset.
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
from core.cli import positive_float, positive_int
from core.cocoeval import JAVA_TIMEOUT_S, CocoEvalUnavailable, CocoScores, coco_caption_scores
from core.fileio import WriteError, abbreviate, atomic_write_text, read_json
from core.layouts import DatasetNotFoundError, add_dataset_args

# A caption longer than this is not a caption (a model's are under ~300 characters); a 1 MB one kills METEOR's JVM.
MAX_CAPTION_CHARS = 2000


def _check_caption(path: Path, i: int, image_id: Any, caption: Any, max_chars: int) -> None:
    where, which = f"{path}: [{i}].caption", f"(image_id {abbreviate(image_id)})"
    if not isinstance(caption, str):
        raise DataFormatError(f"{where}: expected a string, found {type(caption).__name__}")
    if len(caption) > max_chars:
        raise DataFormatError(f"{where}: {len(caption)} characters, over the bound of {max_chars} "
                              f"(--max-caption-chars) {which}")
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escape: a lone surrogate, which no tool can encode
        raise DataFormatError(f"{where}: holds {caption[e.start]!r} at character {e.start}, a lone surrogate "
                              f"(not text) {which}") from None


def read_results(path: Path, max_caption_chars: int = MAX_CAPTION_CHARS) -> list[tuple[Any, str]]:
    """``(image_id, caption)`` of each entry, every caption checked against the bounds before any scoring;
    DataFormatError names the file and the entry (long values cut short)."""
    data = read_json(path, DataFormatError)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{\"image_id\": ..., \"caption\": ...}}, "
                              f"found a {type(data).__name__}")
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "image_id" not in entry:
            raise DataFormatError(f"{path}: [{i}].image_id: missing")
        image_id = entry["image_id"]
        if not isinstance(image_id, (str, int)) or isinstance(image_id, bool):
            raise DataFormatError(f"{path}: [{i}].image_id: expected a name or a number, found "
                                  f"{abbreviate(image_id)}")
        if "caption" not in entry:
            raise DataFormatError(f"{path}: [{i}].caption: expected a string, found missing")
        _check_caption(path, i, image_id, entry["caption"], max_caption_chars)
        out.append((image_id, entry["caption"]))
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
            raise DataFormatError(f"{path}: [{i}].image_id {abbreviate(image_id)} is not an image of the {split} "
                                  f"split ({len(names)} images, e.g. {list(names[:2])})")
        if name in captions:
            raise DataFormatError(f"{path}: [{i}].image_id {abbreviate(image_id)}: a second caption for {name!r}")
        captions[name] = caption
    return captions


def evaluate_captions(captions: dict[str, str], references: dict[str, list[str]], spice: bool = True,
                      java_timeout_s: float = JAVA_TIMEOUT_S) -> CocoScores:
    """The COCO caption metrics of ``captions`` (name -> caption) against ``references`` (name -> raw captions)."""
    return coco_caption_scores(captions, {n: references[n] for n in captions}, spice=spice,
                               java_timeout_s=java_timeout_s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help='COCO-format results: [{"image_id": ..., "caption": ...}]')
    add_dataset_args(p, data_flag="--data")  # its references are scored against
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="the split the results cover")
    p.add_argument("--no-spice", dest="spice", action="store_false", help="do not try SPICE (slow even offline)")
    p.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    p.add_argument("--max-caption-chars", type=positive_int, default=MAX_CAPTION_CHARS,
                   help=f"refuse a results file holding a longer caption, before scoring (default {MAX_CAPTION_CHARS})")
    p.add_argument("--java-timeout-s", type=positive_float, default=JAVA_TIMEOUT_S,
                   help="deadline of each exchange with a Java tool (one METEOR request, the PTB tokenizer, SPICE); "
                        f"past it the tool is killed and named (default {JAVA_TIMEOUT_S:g})")
    return p


def run(args: argparse.Namespace) -> CocoScores:
    from core.data import load_from_args  # (imports torch: only when a dataset is read)

    t0 = time.perf_counter()
    results = read_results(args.results, args.max_caption_chars)  # a bad results file fails before the dataset is read
    data = load_from_args(args)
    names = data.splits[args.split]
    captions = match_results(results, names, data.ids, args.results, args.split)
    if len(captions) < len(names):
        print(f"note: the results cover {len(captions)} of the {len(names)} {args.split} images; "
              f"only those are scored", file=sys.stderr)
    scores = evaluate_captions(captions, data.captions, spice=args.spice, java_timeout_s=args.java_timeout_s)
    print(f"{args.results} against {data.dataset} {args.split} ({data.root}), {time.perf_counter() - t0:.1f}s")
    print(scores.table())
    if args.json is not None:
        atomic_write_text(args.json, json.dumps({**scores.to_dict(), "split": args.split}, indent=1) + "\n")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        scores = run(args)
    except (DataFormatError, DatasetNotFoundError, CocoEvalUnavailable, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the results file or --json cannot be opened
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    for metric in scores.failed:  # the table said it; the status says it to scripts
        print(f"error: {scores.unavailable[metric]}", file=sys.stderr)
    return 1 if scores.failed else 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
