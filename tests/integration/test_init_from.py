"""--init-from: start training from another captioner's weights with another vocabulary (rows mapped by word)."""

from __future__ import annotations

import pytest
import torch

from core.checkpoint import CheckpointError, make_checkpoint, save_checkpoint
from core.model import CaptionModel, ModelConfig
from core.vocab import Vocabulary
from distributed.resume import init_weights_from

SMALL = dict(backbone="resnet18", encoded_size=2, image_size=64, attention_dim=16, embed_dim=16, decoder_dim=16)


def _model(vocab: Vocabulary, seed: int, **over) -> CaptionModel:
    torch.manual_seed(seed)
    return CaptionModel(ModelConfig(vocab_size=len(vocab), **{**SMALL, **over}))


def test_shared_words_keep_their_rows_and_every_other_weight_is_copied(tmp_path):
    old_vocab = Vocabulary(["red", "circle", "blue", "square"])
    new_vocab = Vocabulary(["square", "green", "red", "triangle"])  # another order, two new words
    old = _model(old_vocab, seed=0)
    save_checkpoint(tmp_path / "old.pt", make_checkpoint(old, old_vocab))
    new = _model(new_vocab, seed=1, dropout=0.1)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}

    report = init_weights_from(new, new_vocab, tmp_path / "old.pt")

    assert "mapped by word" in report and "6 of 8 words shared" in report  # 4 specials + red, square
    theirs, mine = old.state_dict(), new.state_dict()
    for name in ("decoder.embedding.weight", "decoder.fc.weight", "decoder.fc.bias"):
        for word in ("<start>", "<end>", "red", "square"):
            assert torch.equal(mine[name][new_vocab.stoi[word]], theirs[name][old_vocab.stoi[word]]), (name, word)
        for word in ("green", "triangle"):  # not in the old vocabulary: fresh rows
            assert torch.equal(mine[name][new_vocab.stoi[word]], fresh[name][new_vocab.stoi[word]]), (name, word)
    for name, value in theirs.items():
        if not name.startswith(("decoder.embedding", "decoder.fc")):
            assert torch.equal(mine[name], value), name


def test_another_architecture_names_the_flags_to_set(tmp_path):
    vocab = Vocabulary(["a", "b"])
    save_checkpoint(tmp_path / "big.pt", make_checkpoint(_model(vocab, 0, decoder_dim=24), vocab))
    with pytest.raises(CheckpointError, match="--decoder-dim 24"):
        init_weights_from(_model(vocab, 0), vocab, tmp_path / "big.pt")
