"""Command-line helpers shared by every command: positive numbers, dataclass fields that become flags.

    p.add_argument("--batch-size", type=positive_int, default=16)          # 0, -1, "x": one usage line
    raise SystemExit(run_main(main))                                         # `| head` ends it quietly (141)
    image_size: int = flag_field(224, "input side in pixels")               # a config field with its --help text

One concept has one flag name in every command (``--split-seed``, ``--min-word-freq``, ``--beam-size``,
``--max-decode-len``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import field
from typing import Any


def _positive(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be {'1 or more' if kind is int else 'more than 0'}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _positive(int, text)


def positive_float(text: str) -> float:
    return _positive(float, text)


def flag_field(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A dataclass field whose flag (``distributed.config.add_dataclass_args``) has this help text and choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


def run_main(main: Callable[[], int]) -> int:
    """``main()`` of a command run as ``python -m``: when the reader of stdout leaves (``... | head``), stop
    quietly with 141 (128 + SIGPIPE) like other Unix tools instead of a BrokenPipeError traceback."""
    try:
        status = main()
        sys.stdout.flush()  # a pipe's buffered lines go now, inside the guard, not in the interpreter's exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush must not fail too
        return 141
