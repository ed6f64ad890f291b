"""Greedy and beam search as pure control flow over the encode/step contract.

The same functions drive eager PyTorch, TorchScript and ONNX Runtime: a backend only supplies ``Encoded``
(from its encoder) and a ``step`` callable taking and returning torch tensors:

    step(words [M], h [M,D], c [M,D], enc_out [N,P,C], enc_att [N,P,A]) -> logprobs [M,V], h [M,D], c [M,D], alpha [M,P]

Search is batched across images: N images x k beams are M = N*k rows of one step call, grouped image-major.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class Encoded(NamedTuple):
    enc_out: Tensor  # (N, P, C) image features
    enc_att: Tensor  # (N, P, A) encoder side of the attention, computed once per image
    h: Tensor  # (N, D) initial LSTM state
    c: Tensor  # (N, D)


class Hypothesis(NamedTuple):
    tokens: list[int]  # word ids, without <start> and <end>
    score: float  # sum of log-probabilities (incl. <end>), divided by length**length_norm if asked
    alphas: Tensor  # (len(tokens), P) attention over the regions for each word


StepFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _check_args(encoded: Encoded, max_len: int, beam_size: int = 1) -> Encoded:
    encoded = Encoded(*encoded)
    n = encoded.enc_out.shape[0]
    if encoded.enc_out.dim() != 3 or encoded.enc_att.dim() != 3 or encoded.enc_att.shape[:2] != encoded.enc_out.shape[:2]:
        raise ValueError(
            f"expected enc_out (N,P,C) and enc_att (N,P,A), got {tuple(encoded.enc_out.shape)} and {tuple(encoded.enc_att.shape)}"
        )
    if encoded.h.shape[0] != n or encoded.c.shape != encoded.h.shape:
        raise ValueError(f"expected h and c of shape (N={n}, D), got {tuple(encoded.h.shape)} and {tuple(encoded.c.shape)}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    return encoded


@torch.no_grad()
def greedy_search(encoded: Encoded, step: StepFn, max_len: int, start_id: int, end_id: int) -> list[Hypothesis]:
    """Take the most likely word at each step, for N images at once."""
    enc_out, enc_att, h, c = _check_args(encoded, max_len)
    n = enc_out.shape[0]
    words = torch.full((n,), start_id, dtype=torch.long, device=h.device)
    finished = torch.zeros(n, dtype=torch.bool, device=h.device)
    scores = torch.zeros(n, device=h.device)
    tokens, alphas = [], []
    for _ in range(max_len):
        logprobs, h, c, alpha = step(words, h, c, enc_out, enc_att)
        logprobs = logprobs.float()
        words = logprobs.argmax(dim=1)  # (N,)
        scores += torch.where(finished, 0.0, logprobs.gather(1, words[:, None]).squeeze(1))
        tokens.append(words)
        alphas.append(alpha.float())
        finished |= words == end_id
        if finished.all():
            break
    tokens_t = torch.stack(tokens, 1).cpu()  # (N, T)
    alphas_t = torch.stack(alphas, 1).cpu()  # (N, T, P)
    return [_hypothesis(tokens_t[i], float(scores[i]), alphas_t[i], end_id) for i in range(n)]


@torch.no_grad()
def beam_search(
    encoded: Encoded,
    step: StepFn,
    beam_size: int,
    max_len: int,
    start_id: int,
    end_id: int,
    length_norm: float = 0.0,
    early_stop: bool = True,
) -> list[Hypothesis]:
    """Beam search for N images at once, k = beam_size beams each.

    A finished beam keeps its score and stays in the beam (its only continuation is a free <end>), so every
    step has exactly N*k rows. ``length_norm`` = a ranks finished hypotheses by score / length**a (0: raw sum).
    With ``early_stop=False`` all max_len steps run even when every beam has ended (fixed work, for benchmarks).
    Beam size 1 gives the greedy result.
    """
    enc_out, enc_att, h, c = _check_args(encoded, max_len, beam_size)
    n, k, dev = enc_out.shape[0], beam_size, h.device
    h = h.repeat_interleave(k, dim=0)  # (N*k, D)
    c = c.repeat_interleave(k, dim=0)
    words = torch.full((n * k,), start_id, dtype=torch.long, device=dev)
    # Only beam 0 is alive at the start, so the first expansion yields k distinct words.
    scores = torch.full((n, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    finished = torch.zeros(n, k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(n, k, dtype=torch.long, device=dev)  # words emitted, <end> included
    tokens = torch.zeros(n, k, 0, dtype=torch.long, device=dev)
    alphas = torch.zeros(n, k, 0, enc_out.shape[1], device=dev)
    row_base = torch.arange(n, device=dev)[:, None] * k  # (N, 1) first row of each image
    frozen = None
    for _ in range(max_len):
        logprobs, h, c, alpha = step(words, h, c, enc_out, enc_att)
        v = logprobs.shape[-1]
        logprobs = logprobs.float().view(n, k, v)
        if frozen is None:
            frozen = torch.full((v,), float("-inf"), device=dev)
            frozen[end_id] = 0.0
        logprobs = torch.where(finished[..., None], frozen, logprobs)
        scores, flat = (scores[..., None] + logprobs).view(n, k * v).topk(k, dim=1)  # (N, k)
        beam, word = flat // v, flat % v  # which beam each survivor extends, and with which word
        rows = (row_base + beam).view(-1)  # (N*k,)
        h, c = h[rows], c[rows]
        tokens = torch.cat([tokens.gather(1, beam[..., None].expand_as(tokens)), word[..., None]], dim=2)
        alpha = alpha.float().view(n, k, 1, -1).gather(1, beam[..., None, None].expand(n, k, 1, alpha.shape[-1]))
        alphas = torch.cat([alphas.gather(1, beam[..., None, None].expand_as(alphas)), alpha], dim=2)
        was_finished = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was_finished).long()
        finished = was_finished | (word == end_id)
        words = word.view(-1)
        if early_stop and bool(finished.all()):
            break

    ranked = scores / lengths.clamp(min=1).float() ** length_norm if length_norm else scores.clone()
    # Prefer complete captions; an image with none (max_len reached) falls back to its best partial one.
    ranked = torch.where(finished | ~finished.any(dim=1, keepdim=True), ranked, float("-inf"))
    best = ranked.argmax(dim=1).cpu()
    tokens, alphas, ranked = tokens.cpu(), alphas.cpu(), ranked.cpu()
    return [_hypothesis(tokens[i, best[i]], float(ranked[i, best[i]]), alphas[i, best[i]], end_id) for i in range(n)]


def _hypothesis(tokens: Tensor, score: float, alphas: Tensor, end_id: int) -> Hypothesis:
    """Cut a row of emitted words at its first <end>."""
    ends = (tokens == end_id).nonzero()
    length = int(ends[0]) if len(ends) else len(tokens)
    return Hypothesis(tokens[:length].tolist(), score, alphas[:length])
