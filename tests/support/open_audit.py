"""Run commands' ``main(argv)`` one after another in this process, recording every file opened below a watched
folder (symbolic links resolved) with a Python audit hook: how a test proves that nothing outside a dataset root
was read. The hook sees every open() of Python code and of its extensions that go through Python's file API.

    python -m tests.support.open_audit WATCHED_DIR MODULE:FUNC ARG... [-- MODULE:FUNC ARG...]

Prints one JSON object: {"runs": [{"command", "code", "stderr"}], "opened": [paths under WATCHED_DIR]}.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys


def _split(argv: list[str]) -> list[list[str]]:
    commands, current = [], []
    for arg in argv:
        if arg == "--":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    return commands + [current]


def main(argv: list[str]) -> int:
    watched = os.path.realpath(argv[0]) + os.sep
    opened: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path.startswith(watched):
                opened.append(path)

    sys.addaudithook(hook)
    runs = []
    for command in _split(argv[1:]):
        module, func = command[0].split(":")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = getattr(importlib.import_module(module), func)(command[1:])
            except SystemExit as e:
                code = e.code
        runs.append({"command": command[0], "code": code, "stderr": err.getvalue()})
    print(json.dumps({"runs": runs, "opened": sorted(set(opened))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
