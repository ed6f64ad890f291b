"""Caption files of the Flickr8k layout: the file names, line reading and the ``IMAGE#N<TAB>caption`` rule.

    DATA_DIR/Images/*.jpg
    DATA_DIR/Flickr8k.token.txt                     IMAGE.jpg#N<TAB>caption
    DATA_DIR/Flickr_8k.{train,dev,test}Images.txt   optional official split (one image name a line)

Shared by the dataset loader (core.data), the dataset check (core.datacheck) and the synthetic generator
(core.synthetic), so the three agree on names, on what a valid line is and on which lines are skipped.
An image name of any caption file (the token file, Karpathy's) is a path below its image folder, and only that:
:func:`name_escapes` (the name alone) and :func:`resolve_inside` (on disk, through symbolic links) are the one check
every reader applies before a file is opened. Imports no torch.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path

TOKEN_FILE = "Flickr8k.token.txt"
IMAGES_DIR = "Images"
# Karpathy's caption files and the image folders of the other layouts (core.layouts reads them; core.skiplist
# hashes them)
KARPATHY_FILES = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json",
                  "coco": "dataset_coco.json"}
FLICKR30K_IMAGE_DIRS = ("flickr30k-images", IMAGES_DIR)
COCO_IMAGE_DIRS = ("train2014", "val2014")
OFFICIAL_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_BOM = b"\xef\xbb\xbf"
# Words: runs of [a-z0-9], optionally joined by apostrophes ("don't", "dog's").
# Punctuation is dropped, which is what BLEU on Flickr8k conventionally does.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


class DataFormatError(ValueError):
    """A data file exists but its content is not what was expected (message names file and line)."""


class OutsideRootError(DataFormatError):
    """A caption file names an image outside its image folder: absolute, with '..', or through a symbolic link
    out of the folder. Refused whatever the skip list says: nothing of such a name is opened."""


def shown_name(name: str, limit: int = 200) -> str:
    """An image name as messages show it: repr, cut to ``limit`` characters with its length said."""
    return repr(name[:limit]) + (f"... ({len(name)} characters)" if len(name) > limit else "")


def name_escapes(name: str) -> str | None:
    """Why the image name ``name`` cannot be a path inside its image folder, else None: absolute, '..', an empty or
    '.' component, a NUL byte. The part of the check that needs no disk (readers apply it as they parse)."""
    if "\x00" in name:
        return "holds a NUL byte"
    if os.path.isabs(name):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "holds '..'"
    if "" in parts or "." in parts:
        return "holds an empty or '.' path component"
    return None


def refuse_escaping(name: str, where: str = "") -> None:
    """OutsideRootError (``where`` is its prefix: ``FILE:LINE: ``) when :func:`name_escapes` says why."""
    why = name_escapes(name)
    if why:
        raise OutsideRootError(f"{where}image name {shown_name(name)} {why}: refusing names outside the image "
                               "folder")


def resolve_inside(folder: Path, name: str, anchors: Collection[str] = ()) -> Path:
    """``folder / name``, refused (:class:`OutsideRootError`) unless it resolves inside ``folder``, symbolic links
    followed. ``folder`` itself may be a link (a dataset's image folder often is), and so may a first component in
    ``anchors`` (COCO's ``train2014/``, ``val2014/`` at the dataset root): below them, nothing may lead out."""
    why = name_escapes(name)
    if why is None:
        first, _, below = name.partition("/")
        base, rest = (folder / first, below) if first in anchors else (folder, name)
        base_real = os.path.realpath(base)
        real = os.path.realpath(os.path.join(base_real, rest)) if rest else base_real
        if real == base_real or real.startswith(base_real.rstrip(os.sep) + os.sep):
            return folder / name
        raise OutsideRootError(f"image name {shown_name(name)} leads out of the image folder {folder}/ through a "
                               "symbolic link: refusing names outside the image folder")
    raise OutsideRootError(f"image name {shown_name(name)} {why}: refusing names outside the image folder "
                           f"{folder}/")


def read_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str | UnicodeDecodeError, bytes]]:
    """Yield ``(lineno, text, raw)`` of each line; ``text`` is the decode error when the line is not UTF-8.

    A UTF-8 BOM on the first line is dropped and line endings (LF or CRLF) are stripped. Invalid lines
    are yielded, not raised, so the dataset check can report every one and carry on.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n"), raw
            except UnicodeDecodeError as e:
                yield lineno, e, raw


def not_utf8_message(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8"


def read_text_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """``(lineno, text)`` of each line (see :func:`read_lines`); a non-UTF-8 line raises DataFormatError."""
    for lineno, text, raw in read_lines(path):
        if isinstance(text, UnicodeDecodeError):
            raise DataFormatError(f"{path}:{lineno}: {not_utf8_message(raw, text)}")
        yield lineno, text


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


def tokenize(text: str) -> list[str]:
    """Lowercase ``text`` and split it into word tokens (punctuation is dropped). Also ``core.vocab.tokenize``."""
    return _TOKEN_RE.findall(text.lower())


class CaptionFilter:
    """Lines that parse but must not be trained on, by one rule for training and ``python -m core.data check``:

    duplicate-caption  ``IMAGE#N`` seen before, or the same caption (case and spacing ignored) for the same image
    empty-caption      the caption has no word once tokenized (``core.vocab.tokenize``: e.g. ``"..."``)

    The first line of a duplicate is kept; the flagged line is skipped by training and reported by the check.
    """

    def __init__(self, unit: str = "line") -> None:
        self.unit = unit  # what ``lineno`` counts in the messages: a file's lines, or a Karpathy image's sentences
        self.keys: dict[tuple[str, str], int] = {}
        self.texts: dict[tuple[str, str], int] = {}

    def problem(self, lineno: int, name: str, n: str, caption: str) -> tuple[str, str] | None:
        """``(kind, message)`` when the line is to be skipped, else None (and the line is remembered)."""
        text = " ".join(caption.lower().split())
        found = None
        if (name, n) in self.keys:
            found = "duplicate-caption", f"{name}#{n} already on {self.unit} {self.keys[name, n]}"
        elif (name, text) in self.texts:
            found = "duplicate-caption", f"same caption for {name} as {self.unit} {self.texts[name, text]}"
        elif not tokenize(caption):
            found = "empty-caption", f"{name}#{n}: {caption[:40]!r} has no words once tokenized"
        self.keys.setdefault((name, n), lineno)
        self.texts.setdefault((name, text), lineno)
        return found


def parse_token_file(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Parse ``Flickr8k.token.txt`` into ``{image name: [captions in file order]}``.

    Each non-blank line is ``IMAGE#N<TAB>caption`` with ``N`` a non-negative integer; images
    keep the order of their first appearance. Any other line raises :class:`DataFormatError`
    naming ``path:line``. Lines :class:`CaptionFilter` flags are skipped, with one warning that counts them
    per kind (training logs it; ``python -m core.data check`` lists every line).
    """
    path = Path(path)
    captions: dict[str, list[str]] = {}
    rules, skipped = CaptionFilter(), Counter()
    first: dict[str, int] = {}
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        try:
            name, n, caption = parse_caption_line(line)
        except DataFormatError as e:
            raise DataFormatError(f"{path}:{lineno}: {e}") from None
        refuse_escaping(name, f"{path}:{lineno}: ")
        problem = rules.problem(lineno, name, n, caption)
        if problem:
            skipped[problem[0]] += 1
            first.setdefault(problem[0], lineno)
            continue
        captions.setdefault(name, []).append(caption)
    if not captions:
        raise DataFormatError(f"{path}: no captions found (empty file?)")
    if skipped:
        kinds = ", ".join(f"{k} {c} (first on line {first[k]})" for k, c in sorted(skipped.items()))
        warnings.warn(f"{path}: {sum(skipped.values())} caption line(s) skipped: {kinds}; "
                      f"`python -m core.data check {path.parent}` lists them", stacklevel=2)
    return captions
