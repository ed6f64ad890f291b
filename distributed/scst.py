"""Self-critical sequence training (Rennie et al. 2017): the SCST step of distributed/train.py.

    torchrun --nproc_per_node=2 distributed/train.py --data DATA --out runs/scst --init-from runs/ce/best.pt \
        --scst --decoder-lr 5e-5 --lr-schedule plateau --max-steps 300

Each step, for the batch's images: K captions per image are sampled (``core.decode.sample``: the model's
encode/step contract, all B*K rows in one batched pass, no gradient), each is rewarded by its CIDEr-D (and
optionally sentence BLEU-4) against the image's training references with document frequencies of the whole
train split (``core.metrics.CiderD``, built once), and a baseline is subtracted: the greedy caption's reward, or
the mean reward of the image's other samples. The loss is the policy gradient
``-(reward - baseline) * log p(sample)``, averaged over the sampled words; the log-probabilities come from one
teacher-forced pass of the samples through the DDP model (so DDP reduces the gradients as in cross-entropy).
Rewards need no data from other ranks: each rank scores its own images.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from core.data import CaptionTable
from core.decode import Samples, sample
from core.metrics import CiderD, sentence_bleu4
from core.model import CaptionModel
from core.vocab import Vocabulary


class Scst:
    """The SCST stage of one run: the reward's scorer (train-split document frequencies) and the step's loss."""

    def __init__(self, table: CaptionTable, vocab: Vocabulary, samples: int = 5, baseline: str = "greedy",
                 cider_weight: float = 1.0, bleu_weight: float = 0.0, alpha_c: float = 0.0, max_len: int = 50,
                 start_step: int = 0):
        if baseline not in ("greedy", "mean") or (baseline == "mean" and samples < 2):
            raise ValueError(f"baseline must be greedy, or mean with samples >= 2; got {baseline} with {samples}")
        self.table, self.vocab, self.k, self.baseline = table, vocab, samples, baseline
        self.cider_weight, self.bleu_weight, self.alpha_c, self.max_len = cider_weight, bleu_weight, alpha_c, max_len
        self.start_step = start_step
        self.cider = CiderD([table.references(i) for i in range(len(table))])  # df of the train split, once
        self._sums: dict[str, float] = {}
        self._since = time.perf_counter()

    @classmethod
    def from_config(cls, cfg: Any, table: CaptionTable, vocab: Vocabulary) -> "Scst":
        return cls(table, vocab, cfg.scst_samples, cfg.scst_baseline, cfg.scst_cider_weight, cfg.scst_bleu_weight,
                   cfg.scst_alpha_c, cfg.max_decode_len, 0 if cfg.scst else cfg.scst_after)

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: steps done so far) is an SCST step."""
        return step >= self.start_step

    # ------------------------------------------------------------------------------------------ reward
    def rewards(self, tokens: Tensor, lengths: Tensor, images: list[int]) -> Tensor:
        """Reward (R,) of each caption: tokens (R,T) with ``lengths`` (R,) words, of train-table image ``images[r]``."""
        words = [self.vocab.decode_tokens(row[: int(n)].tolist()) for row, n in zip(tokens.cpu(), lengths.cpu())]
        reward = torch.zeros(len(words))
        if self.cider_weight:
            reward += self.cider_weight * torch.tensor(self.cider.score(words, images))
        if self.bleu_weight:
            reward += self.bleu_weight * torch.tensor(sentence_bleu4(words, [self.table.references(i) for i in images]))
        return reward

    def baselines(self, reward: Tensor, greedy_reward: Tensor | None) -> Tensor:
        """(B*K,) baseline of each sample: its image's greedy reward, or the mean of its image's other samples."""
        r = reward.view(-1, self.k)  # (B, K)
        if self.baseline == "greedy":
            return greedy_reward.repeat_interleave(self.k)
        return ((r.sum(dim=1, keepdim=True) - r) / (self.k - 1)).reshape(-1)

    # ------------------------------------------------------------------------------------------ the step
    def loss(self, model: CaptionModel, ddp: torch.nn.Module, images: Tensor, indices: Tensor) -> Tensor:
        """The SCST loss of one batch: images (B,3,S,S) (or cached features (B,P,C)) on the device, ``indices`` (B,)
        rows of the train table."""
        t0 = time.perf_counter()
        samples, greedy = self._sample(model, images)
        t1 = time.perf_counter()
        images_of = [int(i) for i in indices.repeat_interleave(self.k)]
        reward = self.rewards(samples.tokens, samples.lengths, images_of)  # (B*K,)
        greedy_reward = self.rewards(greedy.tokens, greedy.lengths, [int(i) for i in indices]) if greedy else None
        base = self.baselines(reward, greedy_reward)
        t2 = time.perf_counter()
        captions, lengths = self.as_captions(samples)
        logits, alphas = ddp(images, captions, lengths)  # (B*K, T-1, V): K captions per image, one encoder pass
        loss = policy_gradient_loss(logits, captions, lengths, (reward - base).to(logits.device))
        if self.alpha_c:
            loss = loss + self.alpha_c * ((1.0 - alphas.float().sum(dim=1)) ** 2).mean()
        self._add(reward=float(reward.sum()), baseline=float(base.sum()), length=float(samples.lengths.sum()),
                  n=len(reward), reward_s=t2 - t1, sample_s=t1 - t0)
        return loss

    @torch.no_grad()
    def _sample(self, model: CaptionModel, images: Tensor) -> tuple[Samples, Samples | None]:
        """K samples per image and (greedy baseline) the greedy caption, with dropout and BatchNorm updates off."""
        modes = [m.training for m in model.modules()]  # a frozen encoder stays in eval mode after this
        model.eval()
        try:
            # (B,3,S,S) images, or (B,P,C) features from the feature cache (--feature-cache)
            encoded = model.decoder.encode_features(images) if images.dim() == 3 else model.encode(images)
            start, end = self.vocab.start_id, self.vocab.end_id
            samples = sample(encoded, model.step, self.k, self.max_len, start, end, method="sample")
            greedy = sample(encoded, model.step, 1, self.max_len, start, end, method="greedy") \
                if self.baseline == "greedy" else None
        finally:
            for m, training in zip(model.modules(), modes):
                m.training = training
        return samples, greedy

    def as_captions(self, s: Samples) -> tuple[Tensor, Tensor]:
        """Samples as teacher-forcing input: captions (R, T+2) <start> words <end> <pad>..., lengths (R,) incl.
        <start> and <end> (no <end> where the sample was cut at max_len)."""
        r = s.tokens.shape[0]
        start = torch.full((r, 1), self.vocab.start_id, dtype=torch.long, device=s.tokens.device)
        pad = torch.full((r, 1), self.vocab.end_id, dtype=torch.long, device=s.tokens.device)
        captions = torch.cat([start, s.tokens, pad], dim=1)  # (R, T+2); after the first <end> only <end>s
        lengths = 1 + s.lengths + s.finished.long()
        return captions, lengths

    # ------------------------------------------------------------------------------------------ logging
    def _add(self, **values: float) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + v

    def summary(self) -> str:
        """Mean reward, baseline and sampled length since the last summary (this rank), and the reward's share
        of the wall time; resets the sums."""
        s, self._sums = self._sums, {}
        elapsed, self._since = time.perf_counter() - self._since, time.perf_counter()
        if not s.get("n"):
            return ""
        n = s["n"]
        return (f" | scst reward {s['reward'] / n:.3f} baseline {s['baseline'] / n:.3f} "
                f"length {s['length'] / n:.1f} | reward {100 * s['reward_s'] / elapsed:.1f}% "
                f"sampling {100 * s['sample_s'] / elapsed:.1f}% of the time")


def policy_gradient_loss(logits: Tensor, captions: Tensor, lengths: Tensor, advantage: Tensor) -> Tensor:
    """-advantage x log p(word), averaged over the sampled words (<end> included).

    logits (R, T-1, V) of teacher forcing on ``captions`` (R, T) with ``lengths`` (R,); advantage (R,).
    """
    steps = logits.shape[1]
    targets = captions[:, 1 : steps + 1]  # (R, T-1)
    valid = torch.arange(steps, device=lengths.device)[None, :] < (lengths[:, None] - 1)  # (R, T-1)
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, targets[..., None])[..., 0]  # (R, T-1)
    return -(advantage[:, None] * logp * valid).sum() / valid.sum().clamp(min=1)
