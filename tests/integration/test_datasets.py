"""Flickr8k, Flickr30k and COCO layouts (Karpathy's files): detection, errors, scale, and training end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.captions import DataFormatError
from core.data import load_dataset
from core.layouts import READERS, DatasetNotFoundError, create_reader, detect
from core.splits import read_karpathy
from core.synthetic import generate
from core.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {name: generate(base / name, 40, seed=0, size=64, layout=name) for name in ("flickr8k", "flickr30k", "coco")}


def test_each_layout_is_detected_and_read(layouts):
    for name, root in layouts.items():
        assert detect(root) == name
        data = load_dataset(root)
        assert data.dataset == name and len(data.captions) == 40 and data.num_captions == 200
        assert all(data.image_path(n).is_file() for n in data.captions)
    coco = load_dataset(layouts["coco"])
    # Karpathy's split: every 10th image test, the next val, the next restval (-> train), from val2014/
    assert coco.splits.sizes() == {"train": 32, "val": 4, "test": 4}
    assert "val2014/00002.jpg" in coco.splits.train and "val2014/00000.jpg" in coco.splits.test
    restval = {n for n in coco.splits.train if n.startswith("val2014/")}
    assert restval == {f"val2014/{i:05d}.jpg" for i in range(2, 40, 10)}
    assert coco.ids["val2014/00000.jpg"] == 0
    assert load_dataset(layouts["flickr30k"]).images_dir.name == "flickr30k-images"


def test_one_reader_per_layout_behind_one_factory(layouts):
    for name, root in layouts.items():
        reader = create_reader("auto", root)
        assert type(reader) is READERS[name] and reader.dataset == name
        assert create_reader(name, root).read() == reader.read()
    with pytest.raises(ValueError, match="--dataset must be auto or one of"):
        create_reader("flickr9k", layouts["flickr8k"])


def test_a_named_dataset_that_is_not_there_shows_its_layout(layouts):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(layouts["flickr8k"], dataset="coco")
    msg = str(info.value)
    assert "expected layout (coco)" in msg and "dataset_coco.json" in msg and "train2014" in msg
    assert "python -m core.synthetic" in msg and "--layout coco" in msg


def test_an_empty_directory_shows_every_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(tmp_path)
    for name in ("flickr8k", "flickr30k", "coco"):
        assert f"expected layout ({name})" in str(info.value)


def test_two_datasets_in_one_directory_ask_for_dataset(tmp_path):
    generate(tmp_path, 12, seed=0, size=64, layout="flickr30k")
    generate(tmp_path, 12, seed=0, size=64, layout="coco")
    with pytest.raises(DatasetNotFoundError, match="choose one with --dataset"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, dataset="coco").dataset == "coco"


@pytest.mark.parametrize("mutate, field", [
    (lambda img: img.pop("filepath"), "images[3].filepath"),
    (lambda img: img.pop("filename"), "images[3].filename"),
    (lambda img: img["sentences"][1].pop("raw"), "images[3].sentences[1].raw"),
    (lambda img: img["sentences"][0].update(raw=7), "images[3].sentences[0].raw"),
    (lambda img: img.update(split="dev"), "images[3].split"),
    (lambda img: img.update(sentences="a dog"), "images[3].sentences"),
])
def test_an_invalid_karpathy_file_names_the_file_and_the_field(tmp_path, mutate, field):
    root = generate(tmp_path / "coco", 6, seed=0, size=32, layout="coco")
    path = root / "dataset_coco.json"
    data = json.loads(path.read_text())
    mutate(data["images"][3])
    path.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as info:
        load_dataset(root)
    assert str(path) in str(info.value) and field in str(info.value)


def test_600k_captions_build_vocabulary_and_splits_without_opening_images(tmp_path):
    """COCO scale: 120k images x 5 captions in Karpathy's format. Three image files exist (and are not JPEGs: an
    image opened at start-up would fail); the rest are captioned but absent, found by one listing per folder."""
    words = [f"w{i}" for i in range(9000)]
    images = []
    for i in range(120_000):
        split = "train" if i % 20 else ("val", "test", "restval")[i // 20 % 3]
        caps = [{"raw": f"A {words[(i * 7 + k) % 9000]} and {words[(i + k * 31) % 9000]} on a table."}
                for k in range(5)]
        images.append({"filepath": "train2014" if split == "train" else "val2014", "filename": f"{i:012d}.jpg",
                       "cocoid": i, "split": split, "sentences": caps})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    for name in ("train2014/000000000001.jpg", "train2014/000000000002.jpg", "val2014/000000000000.jpg"):
        (tmp_path / name).write_bytes(b"not an image: never opened here")

    t0 = time.perf_counter()
    k = read_karpathy(tmp_path / "dataset_coco.json", use_filepath=True)
    vocab = Vocabulary.build((c for n in k.splits.train for c in k.captions[n]), min_freq=5)
    parsed = time.perf_counter() - t0
    assert sum(len(c) for c in k.captions.values()) == 600_000
    assert k.splits.sizes() == {"train": 116_000, "val": 2_000, "test": 2_000}  # restval went to train
    assert len(vocab) == 4 + 9000 + 4  # the 9000 words, "a", "and", "on", "table"
    with pytest.warns(UserWarning, match="119997 captioned image"):
        data = load_dataset(tmp_path)
    assert sorted(data.captions) == ["train2014/000000000001.jpg", "train2014/000000000002.jpg",
                                     "val2014/000000000000.jpg"]
    print(f"\n600k captions: parsed + vocabulary in {parsed:.1f}s, load_dataset in "
          f"{time.perf_counter() - t0 - parsed:.1f}s")


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
