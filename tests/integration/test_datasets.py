"""Flickr30k and COCO layouts trained and evaluated end to end, and a Flickr8k checkpoint fine-tuned on COCO.

The layouts themselves (detection, errors, scale): tests/unit/data/test_layouts.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.data import load_dataset
from core.synthetic import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {name: generate(base / name, 40, seed=0, size=64, layout=name) for name in ("flickr8k", "flickr30k", "coco")}


def _train(root: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "distributed" / "train.py"), "--data", str(root), "--out", str(out),
           "--preset", "tiny", "--threads", "1", "--no-progress", "--max-steps", "3", *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_train_and_evaluate_end_to_end(layouts, tmp_path, name, monkeypatch, capsys):
    """Train on the layout, then the test split's results are written and scored (COCO metrics for coco)."""
    coco_flag = "--coco-eval" if name == "coco" else "--no-coco-eval"
    run = _train(layouts[name], tmp_path / "run", "--dataset", name, coco_flag)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    results = json.loads((tmp_path / "run" / "test_results.json").read_text())
    assert report["images"] == len(results) == 4
    assert {r["image_id"] for r in results} == set(load_dataset(layouts[name]).splits.test)
    if name == "coco":  # the figures of the training report are those of core.evaluate on its results file
        assert "COCO caption metrics" in run.stdout and "CIDEr-D" in run.stdout
        assert set(report["coco"]["scores"]) >= {"bleu1", "bleu4", "rouge_l", "cider"}
        from core.evaluate import main as evaluate_main

        assert evaluate_main([str(tmp_path / "run" / "test_results.json"), "--data", str(layouts[name]),
                              "--split", "test", "--json", str(tmp_path / "s.json")]) == 0
        assert json.loads((tmp_path / "s.json").read_text())["scores"] == report["coco"]["scores"]
        out = capsys.readouterr().out
        assert "CIDEr-D" in out and "SPICE" in out
    else:  # export.caption writes a results file of the same images that core.evaluate reads
        assert "python -m core.evaluate" in report["coco_skipped"]
        from core.evaluate import main as evaluate_main
        from export.runtime.caption import main as caption_main

        written = tmp_path / "caption_results.json"
        assert caption_main(["--model", str(tmp_path / "run" / "last.pt"), "--backend", "eager", "--data",
                             str(layouts[name]), "--split", "test", "--results-json", str(written), "--threads",
                             "1", "-q"]) == 0
        assert sorted(r["image_id"] for r in json.loads(written.read_text())) == sorted(r["image_id"] for r in results)
        monkeypatch.setenv("PATH", str(tmp_path / "no-java"))  # (the reduced set: Java scoring is tested above)
        assert evaluate_main([str(written), "--data", str(layouts[name]), "--no-spice"]) == 0


def test_fine_tune_a_flickr8k_checkpoint_on_coco_with_another_vocabulary(layouts, tmp_path):
    first = _train(layouts["flickr8k"], tmp_path / "f8k", "--no-coco-eval", "--no-final-eval")
    assert first.returncode == 0, first.stderr[-3000:]
    coco = tmp_path / "coco"
    generate(coco, 40, seed=1, size=64, layout="coco")
    path = coco / "dataset_coco.json"
    path.write_text(path.read_text().replace("square", "box"))  # "box" is new, "square" is gone
    run = _train(coco, tmp_path / "ft", "--init-from", str(tmp_path / "f8k" / "last.pt"), "--no-final-eval")
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if "initialized from" in x)
    n = len(json.loads((tmp_path / "ft" / "vocab.json").read_text())["itos"])
    assert f"of {n} words shared" in line and f"({n - 1} of {n} words shared" in line  # all but "box"
    assert "new words with fresh rows: box" in line
