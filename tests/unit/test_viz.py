"""Figures are written as valid PNGs, atomically, without pyplot; bad shapes give clear errors."""

import sys

import numpy as np
import pytest
from PIL import Image

from core.viz import plot_learning_curve, save_attention_figure, save_captioned_image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path, min_w=100, min_h=100):
    """A complete PNG of a plausible size, and no temporary file left beside it."""
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert min_w <= w <= 5000 and min_h <= h <= 5000, (w, h)
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    return w, h


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


HISTORY = [
    {"epoch": 1, "train_loss": 4.2, "val_loss": 4.5, "bleu4": None},
    {"epoch": 2, "train_loss": 3.6, "val_loss": 4.0, "bleu4": 0.05},
    {"epoch": 3, "train_loss": 3.1, "val_loss": 3.8, "bleu4": 0.08},
]


def test_learning_curve_from_list_of_dicts(tmp_path):
    out = plot_learning_curve(HISTORY, tmp_path / "curve.png")
    assert out == tmp_path / "curve.png"
    check_png(out, min_w=300, min_h=200)


def test_learning_curve_from_dict_of_lists_without_bleu(tmp_path):
    hist = {"epoch": [1, 2], "train_loss": [2.0, 1.5], "test_loss": [2.2, 1.9]}
    out = plot_learning_curve(hist, tmp_path / "sub" / "curve.png")  # creates the folder
    check_png(out, min_w=300, min_h=200)
    # overwriting an existing file goes through os.replace
    plot_learning_curve(hist, out)
    check_png(out, min_w=300, min_h=200)


def test_learning_curve_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_learning_curve([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="train_loss"):
        plot_learning_curve([{"epoch": 1, "val_loss": 1.0}], tmp_path / "c.png")
    with pytest.raises(ValueError, match="different lengths"):
        plot_learning_curve({"train_loss": [1.0, 2.0], "val_loss": [1.0]}, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_captioned_image_from_pil_and_path(tmp_path, image):
    out = save_captioned_image(image, "a very long caption " * 8, tmp_path / "cap.png")
    w, h = check_png(out, min_w=200, min_h=200)
    assert h > w * 48 / 64  # room for the caption under the image
    src = tmp_path / "src.jpg"
    image.save(src)
    check_png(save_captioned_image(src, "", tmp_path / "cap2.png"), min_w=200, min_h=150)


@pytest.mark.parametrize("n_words", [1, 25])
def test_attention_figure(tmp_path, image, n_words):
    grid = 4
    rng = np.random.default_rng(1)
    alphas = rng.random((n_words, grid * grid)).astype(np.float32)
    alphas /= alphas.sum(1, keepdims=True)
    words = [f"w{i}" for i in range(n_words)]
    out = save_attention_figure(image, words, alphas, grid, tmp_path / "att.png", size=64, dpi=40)
    w, h = check_png(out, min_w=80, min_h=80)
    if n_words == 25:  # 26 panels, 5 per row -> 6 rows: taller than wide
        assert h > w


def test_attention_figure_accepts_torch_tensor(tmp_path, image):
    import torch
    alphas = torch.softmax(torch.randn(3, 9, dtype=torch.bfloat16), dim=1)
    out = save_attention_figure(image, ["a", "dog", "<end>"], alphas, 3, tmp_path / "att.png", size=48, dpi=40)
    check_png(out, min_w=80, min_h=50)


def test_attention_figure_shape_errors(tmp_path, image):
    ok = np.full((2, 9), 1 / 9, dtype=np.float32)
    with pytest.raises(ValueError, match=r"3 rows but there are 2 words"):
        save_attention_figure(image, ["a", "b"], np.full((3, 9), 1 / 9), 3, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"P=9 positions but grid=4 gives grid\*grid=16"):
        save_attention_figure(image, ["a", "b"], ok, 4, tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        save_attention_figure(image, ["a", "b"], ok.reshape(2, 3, 3), 3, tmp_path / "x.png")
    with pytest.raises(ValueError, match="grid must be a positive int"):
        save_attention_figure(image, ["a", "b"], ok, 0, tmp_path / "x.png")
    with pytest.raises(TypeError, match="image must be"):
        save_attention_figure(12, ["a", "b"], ok, 3, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []  # nothing written on error


def test_no_pyplot_and_caller_backend_untouched(tmp_path, image):
    import matplotlib

    backend = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_learning_curve(HISTORY, tmp_path / "c.png")
    save_captioned_image(image, "x", tmp_path / "i.png")
    assert matplotlib.get_backend() == backend
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
