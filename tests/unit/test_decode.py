"""Greedy and beam search over the encode/step contract."""

import math

import pytest
import torch

from core.decode import SEARCHES, Encoded, beam_search
from core.model import CaptionModel

START, END = 1, 2


@torch.no_grad()
def greedy_search(encoded: Encoded, step, max_len: int, start_id: int, end_id: int) -> list[tuple[list[int], float]]:
    """The reference beam size 1 must equal: the most likely word at each step, one image at a time."""
    out = []
    for i in range(encoded.enc_out.shape[0]):
        enc_out, enc_att, h, c = (x[i : i + 1] for x in encoded)
        words, tokens, score = torch.tensor([start_id]), [], 0.0
        for _ in range(max_len):
            logprobs, h, c, _ = step(words, h, c, enc_out, enc_att)
            words = logprobs.float().argmax(dim=1)
            score += float(logprobs.float()[0, words[0]])
            if int(words[0]) == end_id:
                break
            tokens.append(int(words[0]))
        out.append((tokens, score))
    return out


@pytest.fixture(scope="module")
def model(tiny_model_config) -> CaptionModel:
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(30, embed_dim=16, decoder_dim=24)).eval()
    # Larger output weights make the distributions peaked and varied, as in a trained model.
    with torch.no_grad():
        model.decoder.fc.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def encoded(model) -> Encoded:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.encode(torch.randn(5, 3, 64, 64))


@pytest.mark.parametrize("search", SEARCHES)
def test_beam_size_one_equals_greedy(model, encoded, search):
    greedy = greedy_search(encoded, model.step, max_len=12, start_id=START, end_id=END)
    beam = beam_search(encoded, model.step, beam_size=1, max_len=12, start_id=START, end_id=END, search=search)
    assert [tokens for tokens, _ in greedy] == [h.tokens for h in beam]
    assert [score for _, score in greedy] == pytest.approx([h.score for h in beam], abs=1e-4)


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_equals_one_image_at_a_time(model, encoded, beam_size, search):
    kw = dict(beam_size=beam_size, max_len=12, start_id=START, end_id=END, search=search)
    batched = beam_search(encoded, model.step, **kw)
    for i, hyp in enumerate(batched):
        single = Encoded(*(t[i : i + 1] for t in encoded))
        (alone,) = beam_search(single, model.step, **kw)
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
    assert [tokens for tokens, _ in greedy] == [[3, 5]] * 2
    assert greedy[0][1] == pytest.approx(math.log(0.3), abs=1e-5)
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
        beam_search(lm.encoded(1), lm, beam_size=2, max_len=0, start_id=START, end_id=END)
    bad = Encoded(torch.zeros(2, 4, 2), torch.zeros(3, 4, 3), torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="enc_att"):
        beam_search(bad, lm, beam_size=2, max_len=5, start_id=START, end_id=END)


class EarlyFinishLM(TableLM):
    """Beam 2: a caption that finishes early and must survive better unfinished beams.

    Words: 3 "a", 4 "b", 5 "c", 6 "d", 7 "x", 8 "y", 9..19 a tail of unlikely words (the rest of each row).
    <start>: a 0.5, b 0.45. a: <end> 2e^-2.954 (so "a" scores -2.954). b: c 0.6, d 0.1. c: x 0.42, y 0.38.
    x: <end> e^-3.287 / (0.45*0.6*0.42) (so "b c x" scores -3.287). y: <end> 0.3. d and the tail: <end> 0.9.
    Step 2's top two are "b c" (0.27) and "a <end>" (0.052). A search that keeps the finished "a" in its slot
    loses it at step 3 to "b c x" (0.113) and "b c y" (0.103), which then end lower (-3.287). The tutorial sets
    "a" aside and returns it; so must the default search.
    """

    def __init__(self):
        v, tail = 20, list(range(9, 20))

        def row(probs):
            p = torch.zeros(v)
            for w, q in probs.items():
                p[w] = q
            p[tail] += (1 - sum(probs.values())) / len(tail)
            return p

        table = torch.stack([row({END: 1.0})] * v)
        table[START] = row({3: 0.5, 4: 0.45})
        table[3] = row({END: 2 * math.exp(-2.954)})
        table[4] = row({5: 0.6, 6: 0.1})
        table[5] = row({7: 0.42, 8: 0.38})
        table[7] = row({END: math.exp(-3.287) / (0.45 * 0.6 * 0.42)})
        table[8] = row({END: 0.3})
        for w in [6, *tail]:
            table[w] = row({END: 0.9})
        self.logprobs = table.clamp(min=1e-12).log()
        self.calls = 0


@pytest.mark.parametrize("search", SEARCHES)
def test_a_finished_caption_is_never_lost(search):
    lm = EarlyFinishLM()
    (hyp,) = beam_search(lm.encoded(1), lm, beam_size=2, max_len=10, start_id=START, end_id=END, search=search)
    assert hyp.tokens == [3]
    assert hyp.score == pytest.approx(-2.954, abs=1e-4)


def test_early_stop_waits_while_a_live_beam_can_still_win_after_length_normalization():
    # Raw sums: "b" (0.36) is final once found, and no live beam can beat it. Per-word averages: "a c <end>"
    # (log 0.30 / 3) beats "b <end>" (log 0.36 / 2) although its sum is lower, so the search must go on.
    raw, norm = TableLM(), TableLM()
    assert beam_search(raw.encoded(1), raw, beam_size=2, max_len=10, start_id=START, end_id=END)[0].tokens == [4]
    hyp = beam_search(norm.encoded(1), norm, beam_size=2, max_len=10, start_id=START, end_id=END, length_norm=1.0)[0]
    assert hyp.tokens == [3, 5] and hyp.score == pytest.approx(math.log(0.3) / 3, abs=1e-5)
    assert raw.calls < norm.calls < 10


def test_tutorial_search_arguments():
    lm = TableLM()
    with pytest.raises(ValueError, match="raw score"):
        beam_search(lm.encoded(1), lm, beam_size=2, max_len=5, start_id=START, end_id=END, search="tutorial",
                    length_norm=1.0)
    with pytest.raises(ValueError, match="search must be one of"):
        beam_search(lm.encoded(1), lm, beam_size=2, max_len=5, start_id=START, end_id=END, search="fairseq")
