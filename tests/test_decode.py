"""Greedy and beam search over the encode/step contract."""

import math

import pytest
import torch

from core.decode import Encoded, beam_search, greedy_search
from core.model import CaptionModel, ModelConfig

START, END = 1, 2


@pytest.fixture(scope="module")
def model() -> CaptionModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, backbone="resnet18", encoded_size=2, image_size=64, attention_dim=16, embed_dim=16, decoder_dim=24)
    model = CaptionModel(cfg).eval()
    # Larger output weights make the distributions peaked and varied, as in a trained model.
    with torch.no_grad():
        model.decoder.fc.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def encoded(model) -> Encoded:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.encode(torch.randn(5, 3, 64, 64))


def test_beam_size_one_equals_greedy(model, encoded):
    greedy = greedy_search(encoded, model.step, max_len=12, start_id=START, end_id=END)
    beam = beam_search(encoded, model.step, beam_size=1, max_len=12, start_id=START, end_id=END)
    assert [h.tokens for h in greedy] == [h.tokens for h in beam]
    assert [h.score for h in greedy] == pytest.approx([h.score for h in beam], abs=1e-4)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_equals_one_image_at_a_time(model, encoded, beam_size):
    batched = beam_search(encoded, model.step, beam_size=beam_size, max_len=12, start_id=START, end_id=END)
    for i, hyp in enumerate(batched):
        single = Encoded(*(t[i : i + 1] for t in encoded))
        (alone,) = beam_search(single, model.step, beam_size=beam_size, max_len=12, start_id=START, end_id=END)
        assert hyp.tokens == alone.tokens
        assert hyp.score == pytest.approx(alone.score, abs=1e-4)
        assert torch.allclose(hyp.alphas, alone.alphas, atol=1e-5)


def test_hypotheses_have_attention_per_word(model, encoded):
    for hyp in beam_search(encoded, model.step, beam_size=3, max_len=8, start_id=START, end_id=END):
        assert hyp.alphas.shape == (len(hyp.tokens), 4)
        assert torch.allclose(hyp.alphas.sum(-1), torch.ones(len(hyp.tokens)), atol=1e-5)
        assert END not in hyp.tokens and len(hyp.tokens) <= 8


def test_wider_beam_never_scores_worse(model, encoded):
    narrow = beam_search(encoded, model.step, beam_size=1, max_len=12, start_id=START, end_id=END)
    wide = beam_search(encoded, model.step, beam_size=5, max_len=12, start_id=START, end_id=END)
    for a, b in zip(narrow, wide):
        if len(b.tokens) < 12 and len(a.tokens) < 12:  # both complete
            assert b.score >= a.score - 1e-4


class TableLM:
    """A real (if tiny) language model: the next-word distribution depends on the previous word only.

    Vocabulary: 0 pad, 1 <start>, 2 <end>, 3 "a", 4 "b", 5 "c". From <start>: a 0.6, b 0.4. After "a": c 0.5, <end>
    0.1, a 0.2, b 0.2 (a long tail). After "b": <end> 0.9, c 0.1. After "c": <end> 1.0.
    Greedy: a (0.6), c (0.5), <end> (1.0) = 0.30. Best: b (0.4), <end> (0.9) = 0.36, which needs a beam of 2.
    """

    def __init__(self):
        probs = torch.full((6, 6), 1e-9)
        probs[1, 3], probs[1, 4] = 0.6, 0.4
        probs[3, 5], probs[3, 2], probs[3, 3], probs[3, 4] = 0.5, 0.1, 0.2, 0.2
        probs[4, 2], probs[4, 5] = 0.9, 0.1
        probs[5, 2] = 1.0
        probs[2, 2] = probs[0, 2] = 1.0
        self.logprobs = (probs / probs.sum(1, keepdim=True)).log()
        self.calls = 0

    def __call__(self, words, h, c, enc_out, enc_att):
        self.calls += 1
        return self.logprobs[words], h, c, torch.full((len(words), enc_out.shape[1]), 1.0 / enc_out.shape[1])

    @staticmethod
    def encoded(n):
        return Encoded(torch.zeros(n, 4, 2), torch.zeros(n, 4, 3), torch.zeros(n, 5), torch.zeros(n, 5))


def test_beam_finds_what_greedy_misses():
    lm = TableLM()
    greedy = greedy_search(lm.encoded(2), lm, max_len=10, start_id=START, end_id=END)
    beam = beam_search(lm.encoded(2), lm, beam_size=2, max_len=10, start_id=START, end_id=END)
    assert [h.tokens for h in greedy] == [[3, 5]] * 2
    assert greedy[0].score == pytest.approx(math.log(0.3), abs=1e-5)
    assert [h.tokens for h in beam] == [[4]] * 2
    assert beam[0].score == pytest.approx(math.log(0.36), abs=1e-5)


def test_finished_beams_keep_their_score_and_stop_early():
    lm = TableLM()
    hyps = beam_search(lm.encoded(1), lm, beam_size=3, max_len=10, start_id=START, end_id=END)
    assert hyps[0].tokens == [4]
    assert lm.calls < 10  # every beam ended: no call past that
    fixed = TableLM()
    beam_search(fixed.encoded(1), fixed, beam_size=3, max_len=10, start_id=START, end_id=END, early_stop=False)
    assert fixed.calls == 10


def test_length_normalization_prefers_longer_captions():
    # Raw sums prefer "b" (log 0.36 over 2 words); per-word averages prefer "a c" (log 0.30 over 3 words):
    # log(0.36)/2 = -0.511 < log(0.30)/3 = -0.401.
    lm = TableLM()
    hyps = beam_search(lm.encoded(1), lm, beam_size=3, max_len=10, start_id=START, end_id=END, length_norm=1.0)
    assert hyps[0].tokens == [3, 5]
    assert hyps[0].score == pytest.approx(math.log(0.3) / 3, abs=1e-5)


def test_max_len_without_end_returns_the_best_partial_caption():
    lm = TableLM()
    hyps = beam_search(lm.encoded(1), lm, beam_size=2, max_len=1, start_id=START, end_id=END)
    assert hyps[0].tokens == [3]


def test_bad_arguments_are_named():
    lm = TableLM()
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(lm.encoded(1), lm, beam_size=0, max_len=5, start_id=START, end_id=END)
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(lm.encoded(1), lm, max_len=0, start_id=START, end_id=END)
    bad = Encoded(torch.zeros(2, 4, 2), torch.zeros(3, 4, 3), torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="enc_att"):
        beam_search(bad, lm, beam_size=2, max_len=5, start_id=START, end_id=END)
