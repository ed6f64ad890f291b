"""The batch job's output: shards of rows ``path, caption, score, tokens, error, model_sha256``, Parquet or JSON lines.

    done = written_paths(out_fs, out_dir, model_sha256)      # what an earlier run of this model already wrote
    with ShardWriter(out_fs, out_dir, "parquet", shard_rows=5000) as w:
        w.write(rows)                                        # a list of dicts, as results come

A shard is written under a hidden temporary name and renamed to ``part-<run>-<n>.<ext>`` when full (or at the end):
a job killed at any point leaves only whole shards, and the rows of the shard it was filling are captioned again by
the rerun. The writer keeps each path once per run, so a batch a restarted actor captions twice is written once.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterable

COLUMNS = ("path", "caption", "score", "tokens", "error", "model_sha256")
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
SHARD_PREFIX = "part-"


def schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("caption", pa.string()), ("score", pa.float64()),
                      ("tokens", pa.list_(pa.int32())), ("error", pa.string()), ("model_sha256", pa.string())])


def _shards(fs, out_dir: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(out_dir, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File
                  and i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(tuple(FORMATS.values())))


def read_rows(fs, out_dir: str, columns: Iterable[str] = COLUMNS) -> list[dict]:
    """Every row of the finished shards (either format), in shard order."""
    import pyarrow.parquet as pq

    columns, rows = list(columns), []
    for shard in _shards(fs, out_dir):
        if shard.endswith(".parquet"):
            rows += pq.read_table(shard, filesystem=fs, columns=columns).to_pylist()
        else:
            with fs.open_input_stream(shard) as f:
                rows += [{k: r.get(k) for k in columns} for r in map(json.loads, f.read().splitlines()) if r]
    return rows


def written_paths(fs, out_dir: str, model_sha256: str) -> set[str]:
    """Paths that finished shards already hold a row for, from this model (the rows of another are not skipped)."""
    return {r["path"] for r in read_rows(fs, out_dir, ("path", "model_sha256")) if r["model_sha256"] == model_sha256}


class ShardWriter:
    """Rows to shards of at most ``shard_rows`` rows, each committed (renamed) when full, after ``flush_s`` seconds
    of filling, and at :meth:`close`; a path already written in this run is dropped (counted in ``duplicates``)."""

    def __init__(self, fs, out_dir: str, fmt: str, shard_rows: int = 5000, flush_s: float = 60.0):
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self.fs, self.out_dir, self.fmt = fs, out_dir.rstrip("/"), fmt
        self.shard_rows, self.flush_s = shard_rows, flush_s
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # two runs never share a name
        self.seq = 0
        self.pending: list[dict] = []
        self.started = time.monotonic()
        self.seen: set[str] = set()
        self.duplicates = 0
        self.shards: list[str] = []
        fs.create_dir(self.out_dir, recursive=True)

    @property
    def rows(self) -> int:
        return len(self.seen)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, rows: Iterable[dict]) -> int:
        """Queue rows (paths new to this run only); commit the shard when it is full or old. Returns rows kept."""
        kept = 0
        for row in rows:
            if row["path"] in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(row["path"])
            self.pending.append({k: row.get(k) for k in COLUMNS})
            kept += 1
            if len(self.pending) >= self.shard_rows:
                self.commit()
        if self.pending and time.monotonic() - self.started >= self.flush_s:
            self.commit()
        return kept

    def _encode(self, rows: list[dict]) -> bytes:
        if self.fmt == "jsonl":
            return "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema()), buf)
        return buf.getvalue()

    def commit(self) -> None:
        """Write the pending rows as one shard: to a hidden name, then renamed (a reader never sees half a shard)."""
        if not self.pending:
            return
        name = f"{SHARD_PREFIX}{self.run}-{self.seq:05d}{FORMATS[self.fmt]}"
        tmp, final = f"{self.out_dir}/.tmp-{name}", f"{self.out_dir}/{name}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(self._encode(self.pending))
        self.fs.move(tmp, final)
        self.shards.append(final)
        self.seq += 1
        self.pending = []
        self.started = time.monotonic()

    def close(self) -> None:
        self.commit()
