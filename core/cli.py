"""Command-line helpers shared by every command: positive numbers, old flag names kept as hidden aliases.

    p.add_argument("--batch-size", type=positive_int, default=16)          # 0, -1, "x": one usage line
    raise SystemExit(run_main(main))                                         # `| head` ends it quietly (141)

    p.add_argument("--split-seed", type=int, default=0, help="...")
    add_deprecated_alias(p, "--seed", "--split-seed", type=int)   # still parses, warns, absent from --help

One concept has one flag name in every command (``--split-seed``, ``--min-word-freq``, ``--beam-size``,
``--max-decode-len``); the names that scripts may still pass keep working through these aliases.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
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


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, new_flag: str, **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"warning: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """``old`` sets the destination of the flag ``new`` (already added), with a warning; hidden from --help."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new_flag=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


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
