"""--captions-per-image k: k captions of each image decoded on one encoder pass."""

from __future__ import annotations

import pytest
import torch

from core.data import CaptionTable
from core.vocab import Vocabulary


def _table() -> tuple[CaptionTable, Vocabulary]:
    captions = {"a.jpg": ["one", "two", "three"], "b.jpg": ["four"], "c.jpg": ["five", "six"]}
    vocab = Vocabulary(["one", "two", "three", "four", "five", "six"])
    return CaptionTable(list(captions), captions, vocab), vocab


def test_k_captions_per_image_wrap_around_image_major():
    table, vocab = _table()
    caps, lengths = table.sample([0, 1, 2], epoch=0, seed=0, k=3)
    assert caps.shape[0] == lengths.shape[0] == 9
    words = [vocab.decode(row[: int(n)].tolist()) for row, n in zip(caps, lengths)]
    assert sorted(words[0:3]) == ["one", "three", "two"]  # every caption of a.jpg once
    assert words[3:6] == ["four"] * 3  # b.jpg has one: repeated
    assert sorted(set(words[6:9])) == ["five", "six"]
    one, _ = table.sample([0, 1, 2], epoch=0, seed=0)
    assert torch.equal(one[:, :2], caps[::3][:, :2])  # k=1 is the first of the k


def test_the_model_decodes_k_captions_on_one_encoder_pass(tiny_model):
    model, _ = tiny_model
    size = model.cfg.image_size
    images = torch.randn(2, 3, size, size)
    captions = torch.randint(4, model.cfg.vocab_size, (6, 5))
    lengths = torch.full((6,), 5)
    logits, alphas = model(images, captions, lengths)
    assert logits.shape[:2] == (6, 4)
    # Row 1 (image 0's second caption) equals decoding that caption alone with image 0.
    alone, _ = model(images[:1], captions[1:2], lengths[1:2])
    torch.testing.assert_close(logits[1], alone[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="captions per image"):
        model(images, captions[:5], lengths[:5])
