"""Command-line helpers shared by every command: old flag names kept as hidden, deprecated aliases.

    p.add_argument("--split-seed", type=int, default=0, help="...")
    add_deprecated_alias(p, "--seed", "--split-seed", type=int)   # still parses, warns, absent from --help

One concept has one flag name in every command (``--split-seed``, ``--min-word-freq``, ``--beam-size``,
``--max-decode-len``); the names that scripts may still pass keep working through these aliases.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


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
