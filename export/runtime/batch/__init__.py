"""Batch captioning at scale on Ray Data: ``python -m export.batch_caption`` (``command.py``).

inputs.py (directories, globs, lists, tables on any pyarrow filesystem) -> plan.py (batch size, actors, threads from
the cluster's resources) -> worker.py (decode tasks through ``core.images``; one Captioner per actor) -> output.py
(Parquet/JSONL shards, exactly once per path and model) with progress.py on stderr. Ray is imported by this package
only (``pip install -e ".[scale]"``): the rest of the toolkit runs without it.
"""
