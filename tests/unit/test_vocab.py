"""Tests of core/vocab.py:  .venv/bin/pytest tests/unit/test_vocab.py -q"""

from __future__ import annotations

import json

import pytest
import torch

from core.vocab import SPECIALS, Vocabulary, VocabFormatError, tokenize

CAPTIONS = ["A dog runs on the grass.", "The dog's ball is RED", "a dog, a cat", "two dogs don't run"]


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A Dog's ball, isn't it?  Two-3 dogs!") == ["a", "dog's", "ball", "isn't", "it", "two", "3", "dogs"]
    assert tokenize("  ...  ") == []
    assert Vocabulary.tokenize("Hi there") == ["hi", "there"]


def test_specials_have_fixed_ids() -> None:
    v = Vocabulary.build(CAPTIONS)
    assert v.itos[:4] == list(SPECIALS)
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert all(v.stoi[w] == i for i, w in enumerate(v.itos))


def test_build_is_ordered_by_frequency_then_alphabetically() -> None:
    v = Vocabulary.build(CAPTIONS)
    assert v.itos[4:7] == ["a", "dog", "the"]  # a x3, dog x2, the x2 (alphabetical tie)
    assert Vocabulary.build(reversed(CAPTIONS)) == v  # order of captions does not matter


def test_min_freq_and_max_size() -> None:
    v = Vocabulary.build(CAPTIONS, min_freq=2)
    assert v.itos[4:] == ["a", "dog", "the"]
    assert "cat" not in v
    assert Vocabulary.build(CAPTIONS, max_size=2).itos[4:] == ["a", "dog"]
    with pytest.raises(ValueError):
        Vocabulary.build(CAPTIONS, min_freq=0)


def test_encode_decode_unknown_words() -> None:
    v = Vocabulary.build(CAPTIONS, min_freq=2)
    ids = v.encode("The dog chases a zebra")
    assert ids == [v.start_id, v.stoi["the"], v.stoi["dog"], v.unk_id, v.stoi["a"], v.unk_id, v.end_id]
    assert v.decode(ids) == "the dog <unk> a <unk>"
    # decode stops at <end>, skips <pad>/<start>, accepts tensors
    assert v.decode(torch.tensor([1, 4, 5, 2, 6, 0, 0])) == "a dog"
    assert v.decode_tokens([0, 1, 4]) == ["a"]
    with pytest.raises(IndexError):
        v.decode([1, 999])


def test_encode_max_len_keeps_end() -> None:
    v = Vocabulary.build(CAPTIONS)
    ids = v.encode("a dog runs on the grass", max_len=4)
    assert len(ids) == 4 and ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == "a dog"
    with pytest.raises(ValueError):
        v.encode("a", max_len=1)


def test_save_load_round_trip(tmp_path) -> None:
    v = Vocabulary.build(CAPTIONS, min_freq=1)
    path = v.save(tmp_path / "sub" / "vocab.json")
    w = Vocabulary.load(path)
    assert w == v and w.itos == v.itos and w.stoi == v.stoi and w.min_freq == 1
    assert Vocabulary.from_dict(v.to_dict()) == v
    # to_dict holds plain values only (it goes into weights_only checkpoints)
    assert json.loads(json.dumps(v.to_dict())) == v.to_dict()
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"version": 1}', "missing key 'itos'"),
        ('["<pad>"]', "expected a JSON object"),
        ('{"itos": ["a", "b"]}', "must start with the specials"),
        ('{"itos": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}', "duplicate word"),
        ('{"itos": ["<pad>", "<start>", "<end>", "<unk>", 3]}', "list of strings"),
    ],
)
def test_load_malformed_names_the_file(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(VocabFormatError, match=message) as info:
        Vocabulary.load(path)
    assert str(path) in str(info.value)
