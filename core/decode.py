"""Beam search as pure control flow over the encode/step contract (beam size 1 is greedy decoding).

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

SEARCHES = ("default", "tutorial")  # beam_search(search=...): see its docstring


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


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """x (N,k,...) and idx (N,j) -> (N,j,...): for each image, the listed beams."""
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand(*idx.shape, *x.shape[2:]))


class _Live:
    """The k live beams of each of N images: the step's inputs and what each beam emitted so far.

    Rows are image-major (row = image * k + beam), so every step has exactly N*k rows whatever the search does.
    """

    def __init__(self, encoded: Encoded, step: StepFn, k: int, start_id: int):
        self.encoded, self.step_fn, self.k = encoded, step, k
        n, p = encoded.enc_out.shape[:2]
        dev = encoded.h.device
        self.h = encoded.h.repeat_interleave(k, dim=0)  # (N*k, D)
        self.c = encoded.c.repeat_interleave(k, dim=0)
        self.words = torch.full((n * k,), start_id, dtype=torch.long, device=dev)  # (N*k,)
        # Only beam 0 is alive at the start, so the first expansion yields k distinct words.
        self.scores = torch.full((n, k), float("-inf"), device=dev)  # (N, k) sums of log-probabilities
        self.scores[:, 0] = 0.0
        self.tokens = torch.zeros(n, k, 0, dtype=torch.long, device=dev)  # (N, k, t)
        self.alphas = torch.zeros(n, k, 0, p, device=dev)  # (N, k, t, P)
        self.row_base = torch.arange(n, device=dev)[:, None] * k  # (N, 1) first row of each image
        self.alpha: Tensor | None = None  # (N, k, P) attention of the last step

    def expand(self) -> Tensor:
        """Run one step; returns the score of every one-word extension of every beam, (N, k, V)."""
        enc = self.encoded
        logprobs, self.h, self.c, alpha = self.step_fn(self.words, self.h, self.c, enc.enc_out, enc.enc_att)
        n, k = self.scores.shape
        self.alpha = alpha.float().view(n, k, -1)
        return self.scores[..., None] + logprobs.float().view(n, k, -1)

    def extended(self, beam: Tensor, word: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (N,j,t+1) and alphas (N,j,t+1,P) of the extensions ``beam`` (N,j) + ``word`` (N,j)."""
        tokens = torch.cat([_take(self.tokens, beam), word[..., None]], dim=2)
        alphas = torch.cat([_take(self.alphas, beam), _take(self.alpha, beam)[:, :, None]], dim=2)
        return tokens, alphas

    def select(self, beam: Tensor, word: Tensor, scores: Tensor) -> None:
        """The next live beams (N,k each): beam ``beam`` extended with ``word``, scored ``scores``."""
        rows = (self.row_base + beam).view(-1)  # (N*k,)
        self.h, self.c = self.h[rows], self.c[rows]
        self.tokens, self.alphas = self.extended(beam, word)
        self.scores, self.words = scores, word.reshape(-1)

    def best(self, length_norm: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per image the best live beam (the fallback where nothing finished): tokens (N,t), alphas, score (N,)."""
        t = self.tokens.shape[2]
        ranked = self.scores / max(t, 1) ** length_norm
        i = ranked.argmax(dim=1, keepdim=True)  # (N, 1)
        return _take(self.tokens, i)[:, 0], _take(self.alphas, i)[:, 0], _take(ranked, i)[:, 0]


def check_search(search: str, length_norm: float = 0.0) -> None:
    """A ValueError unless ``search`` names a search that can rank with ``length_norm``."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if search == "tutorial" and length_norm:
        raise ValueError("the tutorial's search ranks by raw score: length_norm must be 0 with search='tutorial'")


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
    search: str = "default",
) -> list[Hypothesis]:
    """Beam search for N images at once, k = beam_size beams each, N*k rows at every step.

    search="default": the k live beams never hold a finished caption. A caption that ends within the top k
    candidates of a step goes to the image's pool of the k best finished captions, where no unfinished beam can
    displace it; the k best unfinished candidates go on. ``length_norm`` = a ranks finished captions by
    score / length**a (0: the raw sum). Up to max_len words (<end> included). With ``early_stop`` an image is
    done once its pool is full and no live beam can still beat the worst pooled caption, and the search once
    every image is done; ``early_stop=False`` runs all max_len steps (fixed work, for benchmarks).

    search="tutorial": the decisions of the tutorial's ``caption_image_beam_search`` (see _tutorial_search).

    Beam size 1 gives the greedy result in both modes.
    """
    check_search(search, length_norm)
    encoded = _check_args(encoded, max_len, beam_size)
    live = _Live(encoded, step, beam_size, start_id)
    if search == "tutorial":
        tokens, alphas, scores = _tutorial_search(live, max_len, end_id, early_stop)
    else:
        tokens, alphas, scores = _pooled_search(live, max_len, end_id, length_norm, early_stop)
    tokens, alphas, scores = tokens.cpu(), alphas.cpu(), scores.cpu()
    return [_hypothesis(tokens[i], float(scores[i]), alphas[i], end_id) for i in range(len(scores))]


def _pooled_search(live: _Live, max_len: int, end_id: int, length_norm: float, early_stop: bool):
    """The default search; returns per image the best caption's tokens (N,T), alphas (N,T,P), score (N,)."""
    n, k = live.scores.shape
    dev = live.scores.device
    pool_rank = torch.full((n, k), float("-inf"), device=dev)  # (N, k) ranking scores, best first
    pool_tokens = torch.zeros(n, k, 0, dtype=torch.long, device=dev)  # (N, k, t) padded with <end>
    pool_alphas = torch.zeros(n, k, 0, live.alphas.shape[-1], device=dev)  # (N, k, t, P)
    done = torch.zeros(n, dtype=torch.bool, device=dev)  # image's pool can no longer change
    for t in range(1, max_len + 1):
        cand = live.expand()  # (N, k, V)
        v = cand.shape[-1]
        top, flat = cand.view(n, k * v).topk(min(2 * k, k * v), dim=1)  # (N, 2k): at most k of them end
        beam, word = flat // v, flat % v
        ends = word == end_id
        # Captions that end within the top k go to the pool: (N, k) candidates, ranked by the scoring rule.
        new_rank = torch.where(ends[:, :k] & ~done[:, None], top[:, :k] / t**length_norm, float("-inf"))
        new_tokens, new_alphas = live.extended(beam[:, :k], word[:, :k])
        pool_tokens, pool_alphas = _pad(pool_tokens, t, end_id, dim=2), _pad(pool_alphas, t, 0, dim=2)
        pool_rank, keep = torch.cat([pool_rank, new_rank], dim=1).topk(k, dim=1)  # (N, k)
        pool_tokens = _take(torch.cat([pool_tokens, new_tokens], dim=1), keep)
        pool_alphas = _take(torch.cat([pool_alphas, new_alphas], dim=1), keep)
        # The k best unfinished candidates, in rank order (a stable sort puts the unfinished ones first).
        go_on = torch.sort(ends.int(), dim=1, stable=True).indices[:, :k]  # (N, k)
        live.select(_take(beam, go_on), _take(word, go_on), _take(top, go_on))
        if early_stop and t < max_len:
            done |= _cannot_beat(live.scores, t, max_len, length_norm, pool_rank[:, -1])
            if bool(done.all()):
                break
    return _or_best_live(pool_tokens[:, 0], pool_alphas[:, 0], pool_rank[:, 0], live, length_norm, end_id)


def _or_best_live(tokens: Tensor, alphas: Tensor, score: Tensor, live: _Live, length_norm: float, end_id: int):
    """The finished caption of each image (tokens (N,t), alphas (N,t,P), score (N,), -inf where none), or where
    nothing finished (max_len reached) the best unfinished beam."""
    live_tokens, live_alphas, live_score = live.best(length_norm)
    found = score > float("-inf")  # (N,)
    width = max(tokens.shape[1], live_tokens.shape[1])
    tokens = torch.where(found[:, None], _pad(tokens, width, end_id), _pad(live_tokens, width, end_id))
    alphas = torch.where(found[:, None, None], _pad(alphas, width, 0), _pad(live_alphas, width, 0))
    return tokens, alphas, torch.where(found, score, live_score)


def _cannot_beat(scores: Tensor, t: int, max_len: int, length_norm: float, worst: Tensor) -> Tensor:
    """(N,) True where no live beam (scores (N,k) after t words) can still end above ``worst`` (N,).

    A beam's sum only falls as it grows, and it ends with between t+1 and max_len words; score / length**a is
    monotonic in the length, so its best possible value is at one of those two ends.
    """
    best = torch.maximum(scores / (t + 1) ** length_norm, scores / max_len**length_norm).amax(dim=1)  # (N,)
    return (worst > float("-inf")) & (best <= worst)


def _pad(x: Tensor, width: int, value: float, dim: int = 1) -> Tensor:
    """Pad dimension ``dim`` of x to ``width`` with ``value``."""
    shape = list(x.shape)
    extra, shape[dim] = width - shape[dim], width - shape[dim]
    return torch.cat([x, x.new_full(shape, value)], dim=dim) if extra else x


def _tutorial_search(live: _Live, max_len: int, end_id: int, early_stop: bool):
    """The decisions of the tutorial's caption_image_beam_search, for N images at once.

    As in the tutorial: step 1 expands beam 0 only; each step takes the top k_i candidates of image i's live
    beams (k_i = k at first); those that end are set aside as complete and k_i shrinks by their number; the
    search stops when k_i = 0 for every image, or after max_len steps; the result is the complete caption with
    the best raw score (the first of equal ones). The tutorial's ``if step > 50: break`` follows its 51st step:
    max_len=51 reproduces it (captions of up to 50 words and <end>). Where none completed (the tutorial fails on
    ``max([])``) the best live beam is returned. A set-aside beam stays a row scored -inf, so every step still
    has N*k rows.
    """
    n, k = live.scores.shape
    dev = live.scores.device
    width = torch.full((n, 1), k, device=dev)  # (N, 1) the tutorial's shrinking k, per image
    best = torch.full((n,), float("-inf"), device=dev)  # (N,) best complete score so far
    best_tokens = torch.zeros(n, 0, dtype=torch.long, device=dev)  # (N, t) padded with <end>
    best_alphas = torch.zeros(n, 0, live.alphas.shape[-1], device=dev)  # (N, t, P)
    rank = torch.arange(k, device=dev)[None, :]  # (1, k)
    for t in range(1, max_len + 1):
        cand = live.expand()  # (N, k, V); set-aside beams score -inf
        v = cand.shape[-1]
        top, flat = cand.view(n, k * v).topk(k, dim=1)  # (N, k) best first
        beam, word = flat // v, flat % v
        taken = rank < width  # (N, k) the tutorial's topk(k_i)
        ends = taken & (word == end_id)
        score, first = torch.where(ends, top, float("-inf")).max(dim=1)  # (N,) first of the best, as max()
        better = score > best
        tokens, alphas = live.extended(_take(beam, first[:, None]), _take(word, first[:, None]))
        best = torch.where(better, score, best)
        best_tokens = torch.where(better[:, None], tokens[:, 0], _pad(best_tokens, t, end_id))
        best_alphas = torch.where(better[:, None, None], alphas[:, 0], _pad(best_alphas, t, 0))
        width = width - ends.sum(dim=1, keepdim=True)
        live.select(beam, word, torch.where(taken & ~ends, top, float("-inf")))
        if early_stop and bool((width == 0).all()):
            break
    return _or_best_live(best_tokens, best_alphas, best, live, 0.0, end_id)


def _hypothesis(tokens: Tensor, score: float, alphas: Tensor, end_id: int) -> Hypothesis:
    """Cut a row of emitted words at its first <end>."""
    ends = (tokens == end_id).nonzero()
    length = int(ends[0]) if len(ends) else len(tokens)
    return Hypothesis(tokens[:length].tolist(), score, alphas[:length])
