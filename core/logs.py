"""One logging setup for every command: the same prefix, level from -v/-q, rank-aware, to stderr.

    parser = argparse.ArgumentParser(); add_verbosity_args(parser)
    args = parser.parse_args()
    log = setup_logging("export", args.verbose - args.quiet)        # "[export] message"
    log = setup_logging("train", 0, rank=env.rank, world_size=env.world_size, info_stream=sys.stdout)
                                            # "[train rank 1] ..." on rank 1; progress on stdout, problems on stderr

Messages go to whatever ``sys.stderr`` is at the time of the call (pytest's capture, a redirect), not the stream
that existed at setup. A command whose stdout is not data (training) may send its info lines there
(``info_stream=sys.stdout``); warnings and errors always go to stderr. In a multi-process run only rank 0 logs INFO; the other ranks log warnings and errors,
prefixed with their rank, so a failure on any rank is seen once and attributed.
"""

from __future__ import annotations

import argparse
import logging
import sys

ROOT = "sat"  # every logger of the toolkit is "sat.<command>"; the root logger is left alone


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler whose stream is always the current ``sys.stderr`` (or ``sys.stdout``)."""

    def __init__(self, stdout: bool = False) -> None:
        self.stdout = stdout
        super().__init__()

    @property
    def stream(self):
        return sys.stdout if self.stdout else sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def add_verbosity_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="only warnings and errors")


def verbosity_from(argv: list[str] | None = None) -> int:
    """-v/-q counted from a command line that another parser reads (``argv`` None: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_verbosity_args(parser)
    known, _ = parser.parse_known_args(argv)
    return known.verbose - known.quiet


def level_for(verbosity: int) -> int:
    """0 -> INFO, >= 1 -> DEBUG, <= -1 -> WARNING."""
    return logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO


def setup_logging(command: str, verbosity: int = 0, rank: int = 0, world_size: int = 1,
                  info_stream=None) -> logging.Logger:
    """The logger ``sat.<command>``, configured once per process (calling again reconfigures it)."""
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(h)
    prefix = f"[{command}]" if world_size <= 1 else f"[{command} rank {rank}]"
    handlers = [_StderrHandler()]
    if info_stream is sys.stdout:
        handlers[0].setLevel(logging.WARNING)
        handlers.append(_StderrHandler(stdout=True))
        handlers[1].addFilter(lambda record: record.levelno < logging.WARNING)
    for handler in handlers:
        handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
        root.addHandler(handler)
    level = level_for(verbosity)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    root.propagate = False
    return logging.getLogger(f"{ROOT}.{command}")


def get_logger(command: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{command}")
