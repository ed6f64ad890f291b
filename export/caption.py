"""python -m export.caption: the caption command, whose code is export/runtime/caption.py."""

from core.cli import run_main
from export.runtime.caption import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
