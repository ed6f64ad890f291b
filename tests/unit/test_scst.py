"""SCST's reward and loss on a tiny model: a reference caption earns a positive reward, the policy gradient moves
probability toward the sample whose reward dominates, the baselines and the one-pass sampling step."""

from __future__ import annotations

import pytest
import torch

from core.data import CaptionTable
from core.metrics import cider_d_per_image
from core.model import CaptionModel
from core.vocab import Vocabulary, tokenize
from distributed.scst import Scst, policy_gradient_loss

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = {
    "a.jpg": ["a red circle above a blue square", "a red circle over a blue square", "red circle on top"],
    "b.jpg": ["two green triangles side by side", "a pair of green triangles", "green triangles"],
    "c.jpg": ["a yellow star in the corner", "one yellow star", "a small yellow star at the left"],
}


@pytest.fixture(scope="module")
def setup(tiny_model_config):
    vocab = Vocabulary.build([c for caps in CAPTIONS.values() for c in caps])
    table = CaptionTable(list(CAPTIONS), CAPTIONS, vocab)
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(len(vocab), dropout=0.0))
    return vocab, table, model


def _ids(vocab: Vocabulary, text: str) -> torch.Tensor:
    return torch.tensor([vocab.stoi[w] for w in tokenize(text)])


def test_a_reference_caption_earns_a_positive_reward_and_beats_a_wrong_one(setup):
    vocab, table, _ = setup
    scst = Scst(table, vocab, samples=2, baseline="mean")
    good, bad = _ids(vocab, CAPTIONS["a.jpg"][0]), _ids(vocab, "two green triangles side by side")
    tokens = torch.full((2, 8), vocab.end_id)
    tokens[0, : len(good)], tokens[1, : len(bad)] = good, bad
    reward = scst.rewards(tokens, torch.tensor([len(good), len(bad)]), [0, 0])
    assert reward[0] > 0 and reward[0] > reward[1] + 1.0
    # the reward is CIDEr-D with the train split's document frequencies: the corpus CIDEr-D of that caption
    refs = [table.references(i) for i in range(len(table))]
    hyps = [tokenize(CAPTIONS["a.jpg"][0]), tokenize(CAPTIONS["b.jpg"][0]), tokenize(CAPTIONS["c.jpg"][0])]
    assert float(reward[0]) == pytest.approx(cider_d_per_image(hyps, refs)[0], abs=1e-6)
    # mean-of-others baseline: each sample's advantage is its reward minus the other one's
    base = scst.baselines(reward, None)
    assert base.tolist() == pytest.approx([float(reward[1]), float(reward[0])])


def _seq_logprob(model: CaptionModel, images, captions, lengths) -> torch.Tensor:
    logits, _ = model(images, captions, lengths)
    return -torch.stack([policy_gradient_loss(logits[i : i + 1], captions[i : i + 1], lengths[i : i + 1],
                                              torch.ones(1)) for i in range(len(captions))])


def test_the_policy_gradient_moves_toward_the_higher_reward_sample(setup):
    vocab, table, model = setup
    scst = Scst(table, vocab, samples=2, baseline="mean")
    image = torch.randn(1, 3, 64, 64)
    texts = [CAPTIONS["a.jpg"][0], "two green triangles side by side"]  # for image a: right, then wrong
    ids = [_ids(vocab, t) for t in texts]
    tokens = torch.full((2, 8), vocab.end_id)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    lengths = torch.tensor([len(x) for x in ids])
    reward = scst.rewards(tokens, lengths, [0, 0])
    advantage = reward - scst.baselines(reward, None)  # (+d, -d): the right caption dominates
    assert advantage[0] > 0 > advantage[1]
    captions = torch.cat([torch.full((2, 1), vocab.start_id), tokens, torch.full((2, 1), vocab.end_id)], dim=1)
    caption_lengths = lengths + 2
    model.train()
    before = _seq_logprob(model, image, captions, caption_lengths).detach()
    logits, _ = model(image, captions, caption_lengths)
    model.zero_grad()
    policy_gradient_loss(logits, captions, caption_lengths, advantage).backward()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p -= 0.05 * p.grad
    after = _seq_logprob(model, image, captions, caption_lengths).detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_one_scst_step_samples_k_captions_per_image_and_gives_a_finite_loss(setup):
    vocab, table, model = setup
    scst = Scst(table, vocab, samples=3, baseline="greedy", max_len=10)
    model.train()
    model.encoder.eval()  # a frozen pretrained encoder, as train_one_epoch sets it
    torch.manual_seed(3)
    loss = scst.loss(model, model, torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert model.decoder.fc.weight.grad is not None
    # Sampling left every module's mode as it was: the decoder trains, the frozen encoder's BatchNorm stays in eval
    assert model.decoder.training and not any(m.training for m in model.encoder.modules())
    line = scst.summary()
    assert "scst reward" in line and "baseline" in line and "length" in line and "% of the time" in line
