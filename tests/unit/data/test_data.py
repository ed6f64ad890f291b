"""Tests of core/data.py:  .venv/bin/pytest tests/unit/data/test_data.py -q"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.captions import DataFormatError, parse_token_file
from core.data import CaptionTable, DatasetNotFoundError, EvalDataset, TrainDataset, caption_choice, \
    load_dataset
from core.images import IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, image_transform, load_image, train_resize_size
from core.splits import Splits, make_splits, random_splits, read_karpathy
from core.synthetic import generate
from core.vocab import Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN_TEXT = (
    "b.jpg#0\tA dog runs .\n"
    "b.jpg#1\tThe dog is running\n"
    "\n"
    "a.jpg#0\tA cat sleeps .\n"
    "odd.jpg.1#0\tA name with a dot suffix , as in the real file\n"
    "b.jpg#2\tA brown dog\n"
)


def load_karpathy_json(path):
    """Captions and splits from a Karpathy file, image names = ``filename``."""
    k = read_karpathy(path, use_filepath=False)
    return k.captions, k.splits


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared by the tests of this module (read-only)."""
    return generate(tmp_path_factory.mktemp("data") / "synth", num_images=20, seed=0, size=64)


# ------------------------------------------------------------------------------ token file
def test_parse_token_file_keeps_order(tmp_path) -> None:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text(TOKEN_TEXT)
    caps = parse_token_file(path)
    assert list(caps) == ["b.jpg", "a.jpg", "odd.jpg.1"]
    assert caps["b.jpg"] == ["A dog runs .", "The dog is running", "A brown dog"]


def test_parse_token_file_crlf_and_bom(tmp_path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfa.jpg#0\tA cat .\r\na.jpg#1\tA cat sits\r\n")
    assert parse_token_file(path) == {"a.jpg": ["A cat .", "A cat sits"]}


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("c.jpg#0 A caption without a tab", "no tab"),
        ("c.jpg\tno caption number", "IMAGE#N"),
        ("#0\tno image name", "IMAGE#N"),
        ("c.jpg#x\tnot an integer", "integer"),
        ("c.jpg#-1\tnegative", "integer"),
        ("c.jpg#0\t   ", "empty caption"),
    ],
)
def test_parse_token_file_malformed_line_names_file_and_line(tmp_path, bad_line: str, expected: str) -> None:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text(TOKEN_TEXT + bad_line + "\n")  # line 7
    with pytest.raises(DataFormatError, match=expected) as info:
        parse_token_file(path)
    assert f"{path}:7:" in str(info.value)


def test_parse_token_file_non_utf8(tmp_path) -> None:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_bytes(b"a.jpg#0\tA cat\na.jpg#1\tA caf\xe9 table\n")
    with pytest.raises(DataFormatError, match="UTF-8") as info:
        parse_token_file(path)
    assert f"{path}:2:" in str(info.value)


def test_parse_token_file_empty(tmp_path) -> None:
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("\n\n")
    with pytest.raises(DataFormatError, match="no captions"):
        parse_token_file(path)


# ------------------------------------------------------------------------------ splits
NAMES = [f"{i:04d}.jpg" for i in range(50)]


def test_random_split_deterministic_disjoint_covering() -> None:
    s = random_splits(NAMES, seed=1)
    assert s == random_splits(list(reversed(NAMES)), seed=1)  # input order does not matter
    assert s != random_splits(NAMES, seed=2)
    assert s.sizes() == {"train": 40, "val": 5, "test": 5}
    all_names = s.train + s.val + s.test
    assert sorted(all_names) == NAMES and len(set(all_names)) == len(NAMES)


@pytest.mark.parametrize("n, sizes", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (12, (10, 1, 1))])
def test_random_split_keeps_one_image_per_split_when_possible(n: int, sizes) -> None:
    s = random_splits(NAMES[:n], seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == sizes


def test_random_split_bad_fractions() -> None:
    with pytest.raises(ValueError):
        random_splits(NAMES, val_frac=0.6, test_frac=0.5)
    with pytest.raises(ValueError):
        random_splits(NAMES, val_frac=-0.1)


def test_splits_reject_overlap() -> None:
    with pytest.raises(ValueError, match="both"):
        Splits(["a"], ["a"], [])


def _write_official(d: Path, train: list[str], val: list[str], test: list[str]) -> None:
    (d / "Flickr_8k.trainImages.txt").write_text("\n".join(train) + "\n")
    (d / "Flickr_8k.devImages.txt").write_text("\n".join(val) + "\n\n")
    (d / "Flickr_8k.testImages.txt").write_text("\n".join(test))


def test_official_split_files_are_used(tmp_path) -> None:
    _write_official(tmp_path, NAMES[:3], NAMES[3:5], NAMES[5:6])
    s = make_splits(NAMES[:6], tmp_path)
    assert (s.train, s.val, s.test) == (NAMES[:3], NAMES[3:5], NAMES[5:6])


def test_official_split_unknown_image_names_file_and_line(tmp_path) -> None:
    _write_official(tmp_path, NAMES[:3], [NAMES[3], "nope.jpg"], NAMES[5:6])
    with pytest.raises(DataFormatError, match="nope.jpg") as info:
        make_splits(NAMES[:6], tmp_path)
    assert f"{tmp_path / 'Flickr_8k.devImages.txt'}:2:" in str(info.value)


def test_official_split_duplicate_and_partial(tmp_path) -> None:
    _write_official(tmp_path, NAMES[:3], NAMES[2:4], [])
    with pytest.raises(DataFormatError, match="already listed"):
        make_splits(NAMES[:6], tmp_path)
    (tmp_path / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(DataFormatError, match="all three"):
        make_splits(NAMES[:6], tmp_path)


# ------------------------------------------------------------------------------ Karpathy json
def test_karpathy_json(tmp_path) -> None:
    data = {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A cat .", "tokens": ["a", "cat"]}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog"}, {"raw": "Dogs"}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "A bird"}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "A fish"}]},
    ]}
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps(data))
    caps, splits = load_karpathy_json(path)
    assert caps == {"a.jpg": ["A cat ."], "b.jpg": ["A dog", "Dogs"], "c.jpg": ["A bird"], "d.jpg": ["A fish"]}
    assert (splits.train, splits.val, splits.test) == (["a.jpg", "b.jpg"], ["c.jpg"], ["d.jpg"])


@pytest.mark.parametrize("content, expected", [
    ("{oops", "not valid JSON"),
    ('{"images": [{"filename": "a.jpg", "split": "train"}]}', "images\\[0\\]"),
    ('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x"}]}]}', "unknown split"),
])
def test_karpathy_json_malformed(tmp_path, content: str, expected: str) -> None:
    path = tmp_path / "k.json"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=expected) as info:
        load_karpathy_json(path)
    assert str(path) in str(info.value)


def test_load_flickr8k_with_karpathy_json(synth, tmp_path) -> None:
    names = sorted(p.name for p in (synth / "Images").iterdir())
    images = [{"filename": n, "split": "val" if i < 2 else "train", "sentences": [{"raw": "a shape"}]}
              for i, n in enumerate(names)]
    images.append({"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "x"}]})
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": images}))
    with pytest.warns(UserWarning, match="missing"):
        data = load_dataset(synth, karpathy_json=path)
    assert data.splits.sizes() == {"train": 18, "val": 2, "test": 0}
    assert data.missing_images == ["gone.jpg"]


# ------------------------------------------------------------------------------ dataset dir
def test_load_flickr8k(synth) -> None:
    data = load_dataset(synth, seed=0)
    assert data.images_dir == synth / "Images"
    assert len(data.captions) == 20 and data.num_captions == 100
    assert data.splits.sizes() == {"train": 16, "val": 2, "test": 2}
    assert load_dataset(synth, seed=0).splits == data.splits
    assert load_dataset(synth, seed=1).splits != data.splits
    assert data.image_path(data.splits.train[0]).is_file()


@pytest.mark.parametrize("missing", ["root", "Images", "token"])
def test_load_flickr8k_missing_layout(tmp_path, missing: str) -> None:
    root = tmp_path / "ds"
    if missing != "root":
        root.mkdir()
        if missing == "token":
            (root / "Images").mkdir()
    with pytest.raises(FileNotFoundError) as info:  # DatasetNotFoundError is a FileNotFoundError
        load_dataset(root)
    msg = str(info.value)
    assert isinstance(info.value, DatasetNotFoundError)
    assert "Images/" in msg and "Flickr8k.token.txt" in msg and "python -m core.synthetic" in msg


def test_captioned_images_missing_on_disk_are_dropped(tmp_path) -> None:
    root = generate(tmp_path / "s", 4, seed=0, size=32)
    with open(root / "Flickr8k.token.txt", "a") as f:
        f.write("2258277193_586949ec62.jpg.1#0\tA caption whose image does not exist\n")
    with pytest.warns(UserWarning, match="1 captioned image"):
        data = load_dataset(root)
    assert len(data.captions) == 4 and data.missing_images == ["2258277193_586949ec62.jpg.1"]


# ------------------------------------------------------------------------------ images
def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _modes(tmp_path: Path) -> dict[str, Path]:
    rgb = Image.new("RGB", (8, 6), (200, 100, 50))
    p = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    p_transparent = p.copy()
    p_transparent.info["transparency"] = 0
    rgba = Image.new("RGBA", (8, 6), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent pixel -> white
    i16 = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    i16.putpixel((0, 0), 0)
    return {
        "1": _save(Image.new("1", (8, 6), 1), tmp_path / "one.png"),
        "L": _save(Image.new("L", (8, 6), 128), tmp_path / "l.png"),
        "LA": _save(Image.new("LA", (8, 6), (0, 0)), tmp_path / "la.png"),
        "P": _save(p, tmp_path / "p.png"),
        "P+transparency": _save(p_transparent, tmp_path / "pt.png", transparency=0),
        "RGBA": _save(rgba, tmp_path / "rgba.png"),
        "CMYK": _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95),
        "I;16": _save(i16, tmp_path / "i16.png"),
        "I": _save(Image.new("I", (8, 6), 1000), tmp_path / "i.tif"),
        "F": _save(Image.new("F", (8, 6), 0.5), tmp_path / "f.tif"),
    }


def test_every_image_mode_becomes_rgb(tmp_path) -> None:
    paths = _modes(tmp_path)
    with Image.open(paths["I;16"]) as im:
        assert im.mode.startswith("I")  # the 16-bit file really is 16-bit
    for mode, path in paths.items():
        img = load_image(path)
        assert img.mode == "RGB" and img.size == (8, 6), mode
    px = {m: load_image(p).getpixel((1, 1)) for m, p in paths.items()}
    assert px["1"] == (255, 255, 255) and px["L"] == (128, 128, 128)
    assert px["LA"] == (255, 255, 255)  # fully transparent -> composited on white
    assert load_image(paths["RGBA"]).getpixel((0, 0)) == (255, 255, 255)
    assert px["RGBA"] == (255, 0, 0)
    assert px["P"] == (200, 100, 50)
    assert px["P+transparency"] == (255, 255, 255)  # palette index 0 was declared transparent
    r, g, b = px["CMYK"]
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert px["I;16"] == (255, 255, 255) and load_image(paths["I;16"]).getpixel((0, 0)) == (0, 0, 0)
    assert px["I"] == (4, 4, 4)  # 32-bit mode holding 16-bit values: 1000 / 257 -> 4
    assert px["F"] == (128, 128, 128)  # float in [0, 1] -> x 255


def test_exif_orientation_is_applied(tmp_path) -> None:
    img = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)
    assert load_image(path, exif_transpose=False).size == (40, 20)


def test_unreadable_images_raise_image_load_error(tmp_path, synth) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    full = (synth / "Images" / "00000.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full[: len(full) // 2])
    for path in (text, truncated, tmp_path / "absent.jpg"):
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------ transforms
def test_train_resize_size() -> None:
    assert [train_resize_size(s) for s in (224, 256, 64, 100)] == [252, 288, 72, 113]  # 112.5 rounds up


def test_eval_transform_shape_and_normalization() -> None:
    t = image_transform(32, train=False)
    x = t(Image.new("RGB", (50, 30), (255, 128, 0)))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.equal(t(Image.new("L", (10, 10), 7)), t(Image.new("RGB", (10, 10), (7, 7, 7))))


def test_eval_transform_resizes_whole_image_without_keeping_aspect() -> None:
    img = Image.new("RGB", (64, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 16))  # left half red, right half blue
    x = image_transform(16, train=False)(img)
    red = x[0] > 0  # red channel above the mean
    assert red[:, :7].all() and not red[:, 9:].any()


def test_train_transform_random_crop_without_flip() -> None:
    img = Image.new("RGB", (40, 40), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 40))  # left half red
    t = image_transform(32, train=True)
    assert t.resize_size == 36 and "resize_size=36" in repr(t)
    torch.manual_seed(0)
    outs = [t(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert len({o.sum().item() for o in outs}) > 1  # crops differ
    assert all((o[0, :, 0] > 0).all() and (o[0, :, -1] < 0).all() for o in outs)  # left stays left
    torch.manual_seed(0)
    assert torch.equal(t(img), outs[0])  # reproducible with torch's seed
    flipped = image_transform(32, train=True, hflip=True)
    torch.manual_seed(0)
    assert any((flipped(img)[0, :, 0] < 0).all() for _ in range(20))


# ------------------------------------------------------------------------------ caption table
@pytest.fixture()
def table_and_vocab() -> tuple[CaptionTable, Vocabulary]:
    caps = {
        "a.jpg": ["a red circle", "a big red circle on the left", "one circle"],
        "b.jpg": ["a blue square"],
        "c.jpg": ["two shapes", "a red circle and a blue square", "shapes", "a square", "circle"],
    }
    vocab = Vocabulary.build(c for cs in caps.values() for c in cs)
    return CaptionTable(["a.jpg", "b.jpg", "c.jpg"], caps, vocab), vocab


def test_caption_table_padding(table_and_vocab) -> None:
    table, vocab = table_and_vocab
    assert table.tokens.shape == (3, 5, 9) and table.tokens.dtype == torch.int64
    assert table.counts.tolist() == [3, 1, 5]
    assert table.lengths[0].tolist() == [5, 9, 4, 0, 0]
    assert table.lengths[1].tolist() == [5, 0, 0, 0, 0]
    assert (table.tokens[1, 1:] == vocab.pad_id).all()
    assert vocab.decode(table.tokens[0, 1]) == "a big red circle on the left"
    assert table.references(0)[1] == ["a", "big", "red", "circle", "on", "the", "left"]


def test_caption_table_max_len_keeps_end(table_and_vocab) -> None:
    _, vocab = table_and_vocab
    t = CaptionTable(["x"], {"x": ["a big red circle on the left"]}, vocab, max_len=4)
    assert t.tokens.shape == (1, 1, 4)
    assert t.tokens[0, 0, -1].item() == vocab.end_id and vocab.decode(t.tokens[0, 0]) == "a big"
    assert len(t.references(0)[0]) == 7  # references stay untruncated


def test_caption_table_sample_deterministic(table_and_vocab) -> None:
    table, vocab = table_and_vocab
    idx = torch.tensor([0, 2, 1, 2])
    caps, lens = table.sample(idx, epoch=3, seed=7)
    caps2, lens2 = table.sample([0, 2, 1, 2], epoch=3, seed=7)
    assert torch.equal(caps, caps2) and torch.equal(lens, lens2)
    assert caps.shape == (4, int(lens.max())) and lens.shape == (4,)
    assert (caps[:, 0] == vocab.start_id).all() and (caps[torch.arange(4), lens - 1] == vocab.end_id).all()
    # the same image gets the same caption within a batch/epoch, whatever its position
    assert torch.equal(caps[1], caps[3])
    # over epochs every caption of an image is used, never an empty slot
    seen = {tuple(table.sample([2], epoch=e, seed=0)[0][0].tolist()) for e in range(60)}
    assert len(seen) == 5
    assert all(0 <= caption_choice(s, e, i, 3) < 3 for s in range(3) for e in range(3) for i in range(3))
    assert table.sample([1], epoch=0, seed=0)[1].tolist() == [5]  # trims to the batch's longest


def test_datasets_shapes(synth) -> None:
    data = load_dataset(synth)
    vocab = data.build_vocab()
    table = data.caption_table("train", vocab)
    ds = TrainDataset(data.images_dir, data.splits.train, image_transform(32, train=True))
    assert len(ds) == len(table) == 16
    img, i = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and i == 3
    images, indices = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    caps, lens = table.sample(indices, epoch=0, seed=0)
    assert images.shape == (4, 3, 32, 32) and caps.shape == (4, int(lens.max()))

    val_table = data.caption_table("val", vocab)
    ev = EvalDataset(data.images_dir, data.splits.val, image_transform(32, train=False), table=val_table)
    img, i = ev[1]
    assert img.shape == (3, 32, 32) and ev.references(i) == val_table.references(1)
    assert torch.equal(ev[1][0], img)  # eval transform is deterministic
    with pytest.raises(ValueError):
        EvalDataset(data.images_dir, data.splits.test, ev.transform, table=val_table)


def test_wide_range_grey_images_are_stretched(tmp_path) -> None:
    i32 = Image.fromarray(np.array([[-5, 100_000], [50_000, 0]], dtype=np.int32))
    f32 = Image.fromarray(np.array([[-1.0, 3.0], [1.0, 0.0]], dtype=np.float32))
    for img, name in ((i32, "i32.tif"), (f32, "f32.tif")):
        out = load_image(_save(img, tmp_path / name))
        assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255), name


def test_info_flags_match_train(synth, capsys) -> None:
    from core.data import main

    assert main(["info", str(synth), "--split-seed", "3", "--min-word-freq", "1"]) == 0
    capsys.readouterr()
    for old in ("--seed", "--min-freq"):  # the names before 0.2 are gone (CHANGELOG.md)
        with pytest.raises(SystemExit):
            main(["info", str(synth), old, "3"])
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    help_text = capsys.readouterr().out
    assert "--split-seed" in help_text and "--min-word-freq" in help_text and "--seed " not in help_text
