"""Flickr8k, Flickr30k and COCO layouts (core/layouts.py, Karpathy's files): one reader per layout, detection,
errors that name the expected layout or the Karpathy field, and COCO scale without opening an image.

Training and evaluating on each layout end to end: tests/integration/test_datasets.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.captions import DataFormatError
from core.data import load_dataset
from core.layouts import READERS, DatasetNotFoundError, create_reader, detect
from core.splits import read_karpathy
from core.synthetic import generate
from core.vocab import Vocabulary


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


@pytest.mark.slow  # COCO scale: 600k captions in a JSON file
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
