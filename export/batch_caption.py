"""python -m export.batch_caption: batch captioning on Ray Data, whose code is export/runtime/batch_caption.py."""

from core.cli import run_main
from export.runtime.batch_caption import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
