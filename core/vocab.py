"""Word vocabulary for captions: tokenize, build from a corpus, encode/decode, JSON save/load.

The tokenizer is a plain regex (lowercase, words of letters/digits with inner apostrophes),
so nothing needs NLTK data and every backend (training, export, runtime) tokenizes the same way.

    >>> v = Vocabulary.build(["A dog runs.", "a dog sits"])
    >>> v.encode("a cat runs")           # <start> a <unk> runs <end>
    [1, 4, 3, 6, 2]
    >>> v.decode([1, 4, 5, 6, 2, 0, 0])
    'a dog runs'

Inspect a saved vocabulary:  python -m core.vocab VOCAB_JSON
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from core.captions import tokenize  # the word rule lives with the caption-line rule; imported from here too
from core.fileio import atomic_write_text, read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)


VOCAB_FORMAT = "sat-vocab"
VOCAB_VERSION = 1


class VocabFormatError(ValueError):
    """A vocabulary file or dict does not have the expected structure."""



class Vocabulary:
    """Maps words to ids and back. Ids 0..3 are the specials ``<pad> <start> <end> <unk>``.

    ``itos[i]`` is the word with id ``i``; ``stoi`` is the inverse dict.
    Build one with :meth:`build` (from training captions only, so validation words
    stay unknown as they would be at test time).
    """

    pad_id: int = 0
    start_id: int = 1
    end_id: int = 2
    unk_id: int = 3

    # Exposed on the class too, so ``Vocabulary.tokenize(text)`` works.
    tokenize = staticmethod(tokenize)

    def __init__(self, words: Iterable[str] = (), min_freq: int = 1) -> None:
        """Create a vocabulary of ``SPECIALS`` followed by ``words`` (in the given order)."""
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        # Recorded only for provenance (saved in the JSON); the words are already filtered.
        self.min_freq = int(min_freq)
        for w in words:
            if not isinstance(w, str) or not w:
                raise VocabFormatError(f"vocabulary words must be non-empty strings, got {w!r}")
            if w in self.stoi:
                raise VocabFormatError(f"duplicate word in vocabulary: {w!r}")
            self.stoi[w] = len(self.itos)
            self.itos.append(w)

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls, captions: Iterable[str], min_freq: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Build from raw caption strings, keeping words seen at least ``min_freq`` times.

        Words are ordered by decreasing frequency, ties broken alphabetically, so the
        same corpus always gives the same ids. ``max_size`` caps the number of
        non-special words (the most frequent are kept).
        """
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        words = sorted((w for w, n in counts.items() if n >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size]
        return cls(words, min_freq=min_freq)

    # ------------------------------------------------------------ encode/decode
    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocabulary(size={len(self)}, min_freq={self.min_freq})"

    def encode_tokens(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``[<start>, ids..., <end>]`` for already tokenized words (unknown -> ``<unk>``).

        ``max_len`` caps the total length including ``<start>`` and ``<end>``; longer
        captions are truncated and still end with ``<end>``.
        """
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        if max_len is not None:
            if max_len < 2:
                raise ValueError(f"max_len must be >= 2 (room for <start> and <end>), got {max_len}")
            ids = ids[: max_len - 2]
        return [self.start_id, *ids, self.end_id]

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """Tokenize ``text`` and encode it with ``<start>``/``<end>`` (see :meth:`encode_tokens`)."""
        return self.encode_tokens(tokenize(text), max_len=max_len)

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids``: stops at the first ``<end>``, skips ``<pad>``/``<start>``.

        ``<unk>`` is kept as the literal token ``"<unk>"``, so metrics count it as wrong.
        Accepts any iterable of ints (list, tuple, 1-D tensor or array).
        """
        words: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            if not 0 <= i < len(self.itos):
                raise IndexError(f"token id {i} out of range for vocabulary of size {len(self)}")
            words.append(self.itos[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        """Space-joined :meth:`decode_tokens`."""
        return " ".join(self.decode_tokens(ids))

    # ---------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain-value dict (str/int/list only) - safe inside a ``weights_only`` checkpoint."""
        return {
            "format": VOCAB_FORMAT,
            "version": VOCAB_VERSION,
            "min_freq": self.min_freq,
            "itos": list(self.itos),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "vocabulary dict") -> Vocabulary:
        """Inverse of :meth:`to_dict`. ``source`` names the origin in error messages."""
        if not isinstance(d, dict):
            raise VocabFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "itos" not in d:
            raise VocabFormatError(f"{source}: missing key 'itos' (the list of words); keys: {sorted(d)}")
        itos = d["itos"]
        if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
            raise VocabFormatError(f"{source}: 'itos' must be a list of strings")
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise VocabFormatError(
                f"{source}: 'itos' must start with the specials {list(SPECIALS)}, got {itos[:4]}")
        version = d.get("version", VOCAB_VERSION)
        if version != VOCAB_VERSION:
            raise VocabFormatError(f"{source}: unsupported version {version!r} (expected {VOCAB_VERSION})")
        try:
            return cls(itos[len(SPECIALS):], min_freq=int(d.get("min_freq", 1)))
        except VocabFormatError as e:
            raise VocabFormatError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON atomically (temp file + rename, so a crash never leaves half a file)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a file written by :meth:`save`; errors name the file."""
        path = Path(path)
        return cls.from_dict(read_json(path, VocabFormatError), source=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.vocab VOCAB_JSON``: print the size and the first words."""
    p = argparse.ArgumentParser(prog="python -m core.vocab", description=__doc__.split("\n\n")[0])
    p.add_argument("vocab_json", type=Path)
    p.add_argument("--show", type=int, default=30, help="number of words to print")
    args = p.parse_args(argv)
    v = Vocabulary.load(args.vocab_json)
    print(f"{args.vocab_json}: {len(v)} entries (min_freq={v.min_freq})")
    print(" ".join(v.itos[: args.show]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
