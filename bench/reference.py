"""The baseline every ratio is measured against: per-image beam search as in the canonical PyTorch tutorial.

This re-implements, from its published algorithm, ``caption_image_beam_search`` of the tutorial's ``caption.py``
(a-PyTorch-Tutorial-to-Image-Captioning), on our model's modules and weights so it computes the same function as
``core.model.CaptionModel``:

- one image at a time, the k beams as the batch;
- the image's features tiled k times (``expand``, then materialized by indexing with the surviving beams);
- the attention's encoder projection ``encoder_att(encoder_out)`` recomputed at every step for every beam
  (the tutorial's ``Attention.forward``), and the weighted encoding as ``(encoder_out * alpha).sum(1)``;
- at step 1 only beam 0 is expanded; a beam that emits <end> is moved to the completed list and removed from the
  batch (k shrinks); the search stops when no beam is left or after ``max_len`` steps;
- the result is the completed sequence with the best (unnormalized) score. Where none completed (the tutorial
  would fail on ``max([])``) the best unfinished one is returned.

The tutorial's own loop is eager PyTorch fp32 on whatever device the image is on; so is this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decode import Hypothesis
from core.model import CaptionModel, DecoderWithAttention


def tutorial_attention(decoder: DecoderWithAttention, encoder_out: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The tutorial's Attention.forward: encoder_out (k,P,C) tiled per beam, h (k,D) -> awe (k,C), alpha (k,P)."""
    att = decoder.attention
    att1 = att.encoder_att(encoder_out)  # (k, P, A): recomputed every step, for every beam
    att2 = att.decoder_att(h)  # (k, A)
    scores = att.full_att(torch.relu(att1 + att2.unsqueeze(1))).squeeze(2)  # (k, P)
    alpha = torch.softmax(scores, dim=1)  # (k, P)
    awe = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)  # (k, C)
    return awe, alpha


def tutorial_step(
    decoder: DecoderWithAttention, prev_words: Tensor, h: Tensor, c: Tensor, encoder_out: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One decoding step of the tutorial's loop: prev_words (k,), h/c (k,D), encoder_out (k,P,C) tiled.

    Returns log-probabilities (k,V), h, c, alpha (k,P): the same function as ``CaptionModel.step``.
    """
    embeddings = decoder.embedding(prev_words)  # (k, E)
    awe, alpha = tutorial_attention(decoder, encoder_out, h)
    gate = torch.sigmoid(decoder.f_beta(h))  # (k, C)
    awe = gate * awe
    h, c = decoder.decode_step(torch.cat([embeddings, awe], dim=1), (h, c))  # (k, D)
    scores = F.log_softmax(decoder.fc(h), dim=1)  # (k, V); dropout is the identity at inference
    return scores, h, c, alpha


@torch.no_grad()
def tutorial_beam_search(
    decoder: DecoderWithAttention,
    encoder_out: Tensor,
    beam_size: int,
    max_len: int,
    start_id: int,
    end_id: int,
    stats: dict | None = None,
) -> Hypothesis:
    """Beam search for ONE image. encoder_out: the encoder's output for it, (1,S,S,C) or (1,P,C).

    ``stats`` (optional) accumulates the work done: "images", "steps" and "rows" (beams stepped, summed over
    steps), so a benchmark can show that the reference did (at most) the fixed work of the batched search.
    """
    k = beam_size
    vocab_size = decoder.fc.out_features
    encoder_dim = encoder_out.shape[-1]
    encoder_out = encoder_out.reshape(1, -1, encoder_dim)  # (1, P, C)
    num_pixels = encoder_out.shape[1]
    encoder_out = encoder_out.expand(k, num_pixels, encoder_dim)  # (k, P, C)
    dev = encoder_out.device

    k_prev_words = torch.full((k,), start_id, dtype=torch.long, device=dev)
    seqs = k_prev_words.unsqueeze(1)  # (k, 1) the sequences so far, <start> included
    top_k_scores = torch.zeros(k, 1, device=dev)
    seqs_alpha = torch.ones(k, 1, num_pixels, device=dev)
    complete_seqs: list[list[int]] = []
    complete_alphas: list[Tensor] = []
    complete_scores: list[float] = []

    h, c = decoder.init_hidden_state(encoder_out)  # (k, D) each
    step = 1
    while True:
        if stats is not None:
            stats["steps"] = stats.get("steps", 0) + 1
            stats["rows"] = stats.get("rows", 0) + k
        scores, h, c, alpha = tutorial_step(decoder, k_prev_words, h, c, encoder_out)
        scores = top_k_scores.expand_as(scores) + scores  # (k, V)
        if step == 1:  # all k beams hold the same <start>: expand beam 0 only
            top_k_scores, top_k_words = scores[0].topk(k, 0, True, True)
        else:
            top_k_scores, top_k_words = scores.view(-1).topk(k, 0, True, True)
        prev_word_inds = torch.div(top_k_words, vocab_size, rounding_mode="floor")  # (k,)
        next_word_inds = top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_word_inds], next_word_inds.unsqueeze(1)], dim=1)
        seqs_alpha = torch.cat([seqs_alpha[prev_word_inds], alpha[prev_word_inds].unsqueeze(1)], dim=1)

        next_words = next_word_inds.tolist()
        incomplete_inds = [i for i, w in enumerate(next_words) if w != end_id]
        complete_inds = [i for i, w in enumerate(next_words) if w == end_id]
        if complete_inds:
            complete_seqs.extend(seqs[complete_inds].tolist())
            complete_alphas.extend(seqs_alpha[complete_inds])
            complete_scores.extend(top_k_scores[complete_inds].tolist())
        k -= len(complete_inds)
        if k == 0 or step >= max_len:
            break
        keep = prev_word_inds[incomplete_inds]
        seqs, seqs_alpha = seqs[incomplete_inds], seqs_alpha[incomplete_inds]
        h, c = h[keep], c[keep]
        encoder_out = encoder_out[keep]  # the tiled features follow their beams (a copy, as in the tutorial)
        top_k_scores = top_k_scores[incomplete_inds].unsqueeze(1)
        k_prev_words = next_word_inds[incomplete_inds]
        step += 1

    if stats is not None:
        stats["images"] = stats.get("images", 0) + 1
    if not complete_seqs:  # max_len reached with no <end>: best unfinished beam
        complete_seqs, complete_alphas = seqs.tolist(), list(seqs_alpha)
        complete_scores = top_k_scores.view(-1).tolist()
    best = max(range(len(complete_scores)), key=complete_scores.__getitem__)
    tokens = [t for t in complete_seqs[best][1:] if t != end_id]  # drop <start> and <end>
    return Hypothesis(tokens, float(complete_scores[best]), complete_alphas[best][1 : 1 + len(tokens)].cpu())


@torch.no_grad()
def reference_caption(
    model: CaptionModel, images: Tensor, beam_size: int, max_len: int, start_id: int, end_id: int,
    stats: dict | None = None,
) -> list[Hypothesis]:
    """End to end as the tutorial serves it: for each image, encode it alone, then beam search it alone."""
    out = []
    for i in range(images.shape[0]):
        encoder_out = model.encoder(images[i : i + 1])  # (1, S, S, C)
        out.append(tutorial_beam_search(model.decoder, encoder_out, beam_size, max_len, start_id, end_id, stats))
    return out


@torch.no_grad()
def reference_beam_search(
    model: CaptionModel, encoder_out: Tensor, beam_size: int, max_len: int, start_id: int, end_id: int,
    stats: dict | None = None,
) -> list[Hypothesis]:
    """Beam search alone, encoder outputs given: encoder_out (N,P,C) (or (N,S,S,C)), one image at a time."""
    return [
        tutorial_beam_search(model.decoder, encoder_out[i : i + 1], beam_size, max_len, start_id, end_id, stats)
        for i in range(encoder_out.shape[0])
    ]


@torch.no_grad()
def reference_steps(model: CaptionModel, words: Tensor, h: Tensor, c: Tensor, tiled: list[Tensor]) -> None:
    """One tutorial step for each of N images (k rows each): the reference of the decoder-step groups.

    ``tiled[i]`` is image i's features tiled per beam, (k,P,C), as the tutorial holds them mid-search.
    """
    k = tiled[0].shape[0]
    for i, enc in enumerate(tiled):
        rows = slice(i * k, (i + 1) * k)
        tutorial_step(model.decoder, words[rows], h[rows], c[rows], enc)
