"""The batch command without Ray: Ray stays out of the toolkit's imports, its inputs, its plan, its shard writer."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow.fs import LocalFileSystem

from export.runtime.batch.inputs import BatchInputError, list_inputs
from export.runtime.batch.output import ShardWriter, read_rows, written_paths
from export.runtime.batch.plan import PlanRequest, make_plan
from tests.support.export_artifacts import ROOT


def test_the_toolkit_imports_without_ray():
    code = ("import sys, export.runtime, export.batch_caption, export.runtime.batch.worker; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_inputs_directory_glob_list_and_tables(tmp_path):
    for name in ("b.jpg", "a.png", "notes.md", ".hidden.jpg", "sub/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# a comment\nb.jpg\n\nmissing.jpg\nsub\n")
    pq.write_table(pa.table({"file": ["a.png", str(tmp_path / "sub/c.jpg")]}), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text(f"path,other\n{tmp_path / 'b.jpg'},1\n")
    _, items = list_inputs([tmp_path])
    assert [i.path for i in items] == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    _, items = list_inputs([tmp_path], recursive=True)
    assert [i.path for i in items][-1] == str(tmp_path / "sub/c.jpg")
    _, items = list_inputs([f"{tmp_path}/**/*.jpg"])
    assert [i.path for i in items] == [str(tmp_path / "b.jpg"), str(tmp_path / "sub/c.jpg")]
    _, items = list_inputs([tmp_path / "list.txt", tmp_path / "t.csv"])  # b.jpg listed twice: one item
    assert [(i.path.rsplit("/", 1)[1], bool(i.error)) for i in items] == [("b.jpg", False), ("missing.jpg", True),
                                                                          ("sub", True)]
    assert "no such image file" in items[1].error and "not a regular file" in items[2].error
    with pytest.raises(BatchInputError, match="cannot read column 'path'.*--path-column"):
        list_inputs([tmp_path / "t.parquet"])
    _, items = list_inputs([tmp_path / "t.parquet"], path_column="file")
    assert [i.error for i in items] == [None, None]
    with pytest.raises(BatchInputError, match="matches no file"):
        list_inputs([f"{tmp_path}/*.webp"])
    with pytest.raises(BatchInputError, match="another filesystem"):
        list_inputs([tmp_path, "s3://bucket/x.jpg"])


def test_plan_from_the_cluster_resources_and_overrides():
    one = make_plan([{"CPU": 2.0}], PlanRequest())
    assert (one.actors, one.threads, one.batch_size) == (2, 1, 32) and one.actor_cpus + one.decode_cpus <= 1
    two = make_plan([{"CPU": 1.0}, {"CPU": 1.0}], PlanRequest())
    assert (two.actors, two.threads) == (2, 1) and two.actor_cpus + two.decode_cpus <= 1  # decoding always fits
    big = make_plan([{"CPU": 32.0}] * 3, PlanRequest())
    assert (big.actors, big.threads) == (96, 1)
    wide = make_plan([{"CPU": 32.0}] * 3, PlanRequest(threads=8))
    assert (wide.actors, wide.threads) == (12, 8)
    gpu = make_plan([{"CPU": 8.0, "GPU": 2.0}], PlanRequest())
    assert (gpu.actors, gpu.actor_gpus, gpu.batch_size) == (2, 1.0, 64)
    mine = make_plan([{"CPU": 2.0}], PlanRequest(batch_size=8, actors=2, threads=1))
    assert (mine.actors, mine.threads, mine.batch_size) == (2, 1, 8) and "--actors" in mine.describe()
    with pytest.raises(ValueError, match="no GPU"):
        make_plan([{"CPU": 2.0}], PlanRequest(device="cuda"))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_shards_commit_whole_drop_repeats_and_resume_by_model(tmp_path, fmt):
    fs, out = LocalFileSystem(), str(tmp_path / "out")
    row = lambda p, sha="a" * 64: {"path": p, "caption": "x y", "score": -1.5, "tokens": [3, 4], "model_sha256": sha}  # noqa: E731
    with ShardWriter(fs, out, fmt, shard_rows=2) as w:
        w.write([row("1"), row("2"), row("1"), row("3", "b" * 64)])
        assert len(w.shards) == 1 and w.duplicates == 1  # "1" again (a retried batch): dropped
        assert [r["path"] for r in read_rows(fs, out)] == ["1", "2"]  # the shard being filled is not visible
    rows = read_rows(fs, out)
    assert [r["path"] for r in rows] == ["1", "2", "3"] and rows[0]["tokens"] == [3, 4] and rows[0]["error"] is None
    assert written_paths(fs, out, "a" * 64) == {"1", "2"}  # another model's rows are not skipped
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]


def test_unusable_inputs_or_model_are_one_line_and_exit_2(tmp_path, capsys):
    from export.runtime.batch.command import main

    (tmp_path / "t.csv").write_text("file\na.jpg\n")
    cases = [([str(tmp_path / "missing.txt")], "missing.txt: no such file"),
             ([str(tmp_path / "t.csv")], "cannot read column 'path'"),
             ([str(tmp_path)], "directory holds no image files"),
             ([str(tmp_path / "t.csv"), "--path-column", "file"], "export directory not found")]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "out"), "--model", str(tmp_path / "none")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err), err
