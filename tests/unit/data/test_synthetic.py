"""Tests of core/synthetic.py:  .venv/bin/pytest tests/unit/data/test_synthetic.py -q"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import synthetic
from core.captions import parse_token_file
from core.data import EvalDataset, TrainDataset, load_dataset
from core.images import image_transform
from core.synthetic import COLORS, SHAPES, Scene, Shape, describe, generate, random_scene, relation, render
from core.vocab import tokenize

REPO = Path(__file__).resolve().parents[3]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_layout_and_captions(tmp_path) -> None:
    out = generate(tmp_path / "synth", num_images=12, seed=3, size=64)
    images = sorted(p.name for p in (out / "Images").iterdir())
    assert images == [f"{i:05d}.jpg" for i in range(12)]
    assert sorted(p.name for p in out.iterdir()) == ["Flickr8k.token.txt", "Images"]
    lines = (out / "Flickr8k.token.txt").read_text().splitlines()
    assert lines[0].startswith("00000.jpg#0\t")
    caps = parse_token_file(out / "Flickr8k.token.txt")
    assert list(caps) == images  # every caption names a real image, every image is captioned
    assert all(len(c) == 5 and len(set(c)) == 5 for c in caps.values())  # 5 distinct paraphrases


def test_same_seed_byte_identical_different_seed_differs(tmp_path) -> None:
    a = tree_digest(generate(tmp_path / "a", 10, seed=7, size=64))
    b = tree_digest(generate(tmp_path / "b", 10, seed=7, size=64))
    c = tree_digest(generate(tmp_path / "c", 10, seed=8, size=64))
    assert a == b
    assert a != c


def test_overwrite_in_place_removes_stale_images(tmp_path) -> None:
    out = tmp_path / "synth"
    generate(out, 8, seed=1, size=64)
    generate(out, 3, seed=1, size=64)
    assert sorted(p.name for p in (out / "Images").iterdir()) == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert tree_digest(out) == tree_digest(generate(tmp_path / "fresh", 3, seed=1, size=64))


def test_refuses_to_overwrite_a_foreign_dataset(tmp_path) -> None:
    (tmp_path / "Images").mkdir()
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n")
    with pytest.raises(FileExistsError, match="--force"):
        generate(tmp_path, 2, seed=0, size=64)
    assert token.read_text().startswith("1000268201")  # untouched
    generate(tmp_path, 2, seed=0, size=64, force=True)


def test_vocabulary_is_small() -> None:
    rng = random.Random(0)
    words = {w for _ in range(500) for c in describe(random_scene(rng), rng) for w in tokenize(c)}
    assert 35 <= len(words) <= 60, sorted(words)
    assert set(COLORS) | set(SHAPES) | {"small", "large", "left", "right", "above", "below"} <= words


_NP = r"an? (?:(small|large) )?(red|green|blue|yellow|purple|orange) (circle|square|triangle)"
_REL = re.compile(_NP + r" (above and to the left of|above and to the right of|below and to the left of|"
                  r"below and to the right of|to the left of|to the right of|above|below) " + _NP)


def _box(s: Shape, size: int) -> tuple[float, float, float, float]:
    cx, cy = s.center(size)
    r = synthetic._EXTENT[s.size] * size / 3 / 2
    return cx - r, cy - r, cx + r, cy + r


def _holds(rel: str, a: Shape, b: Shape, size: int = 128) -> bool:
    """Check a relation on the drawn geometry: boxes must be strictly separated."""
    ax0, ay0, ax1, ay1 = _box(a, size)
    bx0, by0, bx1, by1 = _box(b, size)
    ok = True
    if "left" in rel:
        ok &= ax1 < bx0
    if "right" in rel:
        ok &= bx1 < ax0
    if "above" in rel:
        ok &= ay1 < by0
    if "below" in rel:
        ok &= by1 < ay0
    if rel in ("to the left of", "to the right of"):
        ok &= a.row == b.row  # pure left/right only for shapes side by side
    if rel in ("above", "below"):
        ok &= a.col == b.col
    return bool(ok)


def test_captions_are_true_of_the_scene() -> None:
    rng = random.Random(123)
    n_relations = 0
    for _ in range(400):
        scene = random_scene(rng)
        by_key = {(s.color, s.kind): s for s in scene.shapes}
        assert len(by_key) == len(scene.shapes)  # every phrase picks out one shape
        for cap in describe(scene, rng):
            for size, color, kind in re.findall(_NP, cap):
                s = by_key[(color, kind)]  # KeyError = the caption mentions an absent shape
                assert size in ("", s.size), cap
            count = re.match(r"(?:there are )?(two|three) shapes", cap)
            if count:
                assert {"two": 2, "three": 3}[count.group(1)] == len(scene.shapes), cap
            for m in _REL.finditer(cap):
                a, b = by_key[(m.group(2), m.group(3))], by_key[(m.group(6), m.group(7))]
                assert _holds(m.group(4), a, b), (cap, scene)
                n_relations += 1
    assert n_relations > 200  # relations are actually exercised


def test_relation_rule() -> None:
    a, b = Shape("circle", "red", "small", 0, 0), Shape("square", "blue", "large", 0, 2)
    c = Shape("triangle", "green", "large", 2, 0)
    d = Shape("triangle", "red", "large", 1, 1)
    assert relation(a, b) == "to the left of" and relation(b, a) == "to the right of"
    assert relation(a, c) == "above" and relation(c, a) == "below"
    assert relation(a, d) == "above and to the left of"
    with pytest.raises(ValueError):
        relation(a, a)


def test_render_draws_the_shapes() -> None:
    rng = random.Random(5)
    for _ in range(50):
        scene = random_scene(rng)
        img = render(scene, 96)
        assert img.size == (96, 96) and img.mode == "RGB"
        for s in scene.shapes:  # the box centre is inside every shape kind
            cx, cy = s.center(96)
            assert img.getpixel((int(cx), int(cy))) == COLORS[s.color]
        corners = [img.getpixel(p) for p in ((0, 0), (95, 0), (0, 95), (95, 95))]
        assert all(min(px) >= 200 for px in corners)  # light background, never an object colour


def test_one_object_captions_name_its_place() -> None:
    s = Shape("circle", "orange", "large", 0, 0)
    rng = random.Random(0)
    caps = describe(Scene((s,), 0, 0), rng, k=7)
    assert "an orange circle in the top left corner" in caps
    assert all("orange circle" in c for c in caps)


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path / "x", 0)
    with pytest.raises(ValueError):
        generate(tmp_path / "x", 2, size=8)


def test_cli_dataset_reads_back_end_to_end(tmp_path) -> None:
    """Acceptance: `python -m core.synthetic OUT --images 200 --seed 1` feeds core.data end to end."""
    out = tmp_path / "out" / "synth"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "core.synthetic", str(out), "--images", "200", "--seed", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "200 images" in res.stdout  # one-line summary

    data = load_dataset(out, seed=0)
    assert len(data.captions) == 200 and data.num_captions == 1000
    sizes = data.splits.sizes()
    assert sizes == {"train": 160, "val": 20, "test": 20}
    vocab = data.build_vocab()
    assert 35 <= len(vocab) <= 64

    table = data.caption_table("train", vocab)
    ds = TrainDataset(data.images_dir, data.splits.train, image_transform(64, train=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=0)
    images, indices = next(iter(loader))
    captions, lengths = table.sample(indices, epoch=0, seed=0)
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert captions.shape == (8, int(lengths.max())) and captions.dtype == torch.int64
    assert (captions[:, 0] == vocab.start_id).all()
    assert (captions[torch.arange(8), lengths - 1] == vocab.end_id).all()

    val_table = data.caption_table("val", vocab)
    ev = EvalDataset(data.images_dir, data.splits.val, image_transform(64, train=False), table=val_table)
    img, i = ev[0]
    assert img.shape == (3, 64, 64) and len(ev.references(i)) == 5

    info = subprocess.run([sys.executable, "-m", "core.data", "info", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert "train 160, val 20, test 20" in info.stdout


@pytest.mark.parametrize("layout, files", [
    ("flickr30k", {"dataset_flickr30k.json", "flickr30k-images"}),
    ("coco", {"dataset_coco.json", "train2014", "val2014"}),
])
def test_karpathy_layouts_are_deterministic_and_hold_the_same_scenes(tmp_path, layout, files) -> None:
    a = generate(tmp_path / "a", 12, seed=5, size=48, layout=layout)
    assert {p.name for p in a.iterdir()} == files
    assert tree_digest(a) == tree_digest(generate(tmp_path / "b", 12, seed=5, size=48, layout=layout))
    flickr8k = load_dataset(generate(tmp_path / "f8k", 12, seed=5, size=48))
    data = load_dataset(a)
    # same seed: the same scenes and captions, whatever the layout
    assert sorted(map(sorted, data.captions.values())) == sorted(map(sorted, flickr8k.captions.values()))
    (a / next(iter(files - {"flickr30k-images", "train2014", "val2014"}))).write_text('{"images": []}')
    with pytest.raises(FileExistsError, match="not written by this generator"):
        generate(a, 12, seed=5, size=48, layout=layout)
