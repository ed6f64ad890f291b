"""python -m export.batch_caption: batch captioning on Ray Data, whose code is export/runtime/batch/command.py."""

from core.cli import run_main
from export.runtime.batch.command import main

if __name__ == "__main__":
    raise SystemExit(run_main(main))
