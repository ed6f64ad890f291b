"""Beam search as pure control flow over the encode/step contract (beam size 1 is greedy decoding).

The same functions drive eager PyTorch, TorchScript and ONNX Runtime: a backend only supplies ``Encoded``
(from its encoder) and a ``step`` callable taking and returning torch tensors:

    step(words [M], h [M,D], c [M,D], enc_out [N,P,C], enc_att [N,P,A]) -> logprobs [M,V], h [M,D], c [M,D], alpha [M,P]

Search is batched across images: N images x k beams are M = N*k rows of one step call, grouped image-major.

The decoding controls (``DecodeControls``, all off by default, and then the searches give exactly their old results)
work through the same contract on every backend: sampling (greedy, multinomial, top-k, top-p, with a temperature,
n captions per image, seeded), diverse beam search (groups with a Hamming diversity penalty), trigram blocking, and
bad endings (a caption may not end on a word of a list: its <end> is forbidden inside the search, not filtered after).
``decode`` dispatches to the right search and returns a list of captions per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def blocked_trigrams(tokens: Tensor, vocab_size: int) -> Tensor:
    """(R, V) True for each word that would repeat a trigram of ``tokens`` (R, t) (its last two words + that word)."""
    r, t = tokens.shape
    ban = torch.zeros(r, vocab_size, device=tokens.device)
    if t >= 3:
        # earlier positions i where (tokens[i], tokens[i+1]) equals the last two words: tokens[i+2] is banned
        match = (tokens[:, :-2] == tokens[:, -2:-1]) & (tokens[:, 1:-1] == tokens[:, -1:])  # (R, t-2)
        ban.scatter_add_(1, tokens[:, 2:], match.float())
    return ban > 0


@dataclass(frozen=True)
class Constraints:
    """Rules applied to the scores of every step, before any choice: what can never be emitted."""

    end_id: int
    block_trigrams: bool = False  # no word that repeats a trigram already in the caption
    bad_ending_ids: tuple[int, ...] = ()  # no <end> right after one of these words

    @property
    def active(self) -> bool:
        return self.block_trigrams or bool(self.bad_ending_ids)

    def apply(self, logprobs: Tensor, tokens: Tensor) -> Tensor:
        """logprobs (R, V) of the next word after ``tokens`` (R, t) -> the same with forbidden words at -inf."""
        if tokens.shape[1] == 0 or not self.active:
            return logprobs
        if self.block_trigrams:
            logprobs = logprobs.masked_fill(blocked_trigrams(tokens, logprobs.shape[1]), float("-inf"))
        if self.bad_ending_ids:
            bad = torch.isin(tokens[:, -1], torch.tensor(self.bad_ending_ids, device=tokens.device))  # (R,)
            end = torch.zeros_like(logprobs, dtype=torch.bool)
            end[:, self.end_id] = bad
            logprobs = logprobs.masked_fill(end, float("-inf"))
        return logprobs


class _Live:
    """The k live beams of each of N images: the step's inputs and what each beam emitted so far.

    Rows are image-major (row = image * k + beam), so every step has exactly N*k rows whatever the search does.
    """

    def __init__(self, encoded: Encoded, step: StepFn, k: int, start_id: int, constraints: Constraints | None = None):
        self.encoded, self.step_fn, self.k = encoded, step, k
        self.constraints = constraints if constraints is not None and constraints.active else None
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
        return self.scores[..., None] + self.constrain(logprobs.float()).view(n, k, -1)

    def constrain(self, logprobs: Tensor) -> Tensor:
        """logprobs (N*k, V) of the next word of each row, the words the constraints forbid at -inf."""
        if self.constraints is None:
            return logprobs
        n, k, t = self.tokens.shape
        return self.constraints.apply(logprobs, self.tokens.reshape(n * k, t))

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
    constraints: Constraints | None = None,
) -> list[Hypothesis]:
    """Beam search for N images at once, k = beam_size beams each, N*k rows at every step.

    search="default": the k live beams never hold a finished caption. A caption that ends within the top k
    candidates of a step goes to the image's pool of the k best finished captions, where no unfinished beam can
    displace it; the k best unfinished candidates go on. ``length_norm`` = a ranks finished captions by
    score / length**a (0: the raw sum). Up to max_len words (<end> included). With ``early_stop`` an image is
    done once its pool is full and no live beam can still beat the worst pooled caption, and the search once
    every image is done; ``early_stop=False`` runs all max_len steps (fixed work, for benchmarks).

    search="tutorial": the decisions of the tutorial's ``caption_image_beam_search`` (see _tutorial_search).

    Beam size 1 gives the greedy result in both modes. ``constraints`` (trigram blocking, bad endings) forbid
    words at every step in both modes; None (or none active) changes nothing.
    """
    check_search(search, length_norm)
    encoded = _check_args(encoded, max_len, beam_size)
    live = _Live(encoded, step, beam_size, start_id, constraints)
    if search == "tutorial":
        tokens, alphas, scores = _tutorial_search(live, max_len, end_id, early_stop)
    else:
        tokens, alphas, scores = _pooled_search(live, max_len, end_id, length_norm, early_stop)
    tokens, alphas, scores = tokens.cpu(), alphas.cpu(), scores.cpu()
    return [_hypothesis(tokens[i], float(scores[i]), alphas[i], end_id) for i in range(len(scores))]


class _Pool:
    """The k best finished captions of each image of a default search, and which images are done."""

    def __init__(self, live: _Live, end_id: int, length_norm: float):
        n, k = live.scores.shape
        dev = live.scores.device
        self.end_id, self.length_norm = end_id, length_norm
        self.rank = torch.full((n, k), float("-inf"), device=dev)  # (N, k) ranking scores, best first
        self.tokens = torch.zeros(n, k, 0, dtype=torch.long, device=dev)  # (N, k, t) padded with <end>
        self.alphas = torch.zeros(n, k, 0, live.alphas.shape[-1], device=dev)  # (N, k, t, P)
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)  # image's pool can no longer change

    def advance(self, live: _Live, cand: Tensor, t: int) -> Tensor:
        """One step from the candidates ``cand`` (N,k,V) of ``live``: pool what ends, go on with the k best
        unfinished; returns the words the live beams took (N,k)."""
        n, k, v = cand.shape
        top, flat = cand.view(n, k * v).topk(min(2 * k, k * v), dim=1)  # (N, 2k): at most k of them end
        beam, word = flat // v, flat % v
        ends = word == self.end_id
        # Captions that end within the top k go to the pool: (N, k) candidates, ranked by the scoring rule.
        new_rank = torch.where(ends[:, :k] & ~self.done[:, None], top[:, :k] / t**self.length_norm, float("-inf"))
        new_tokens, new_alphas = live.extended(beam[:, :k], word[:, :k])
        pool_tokens, pool_alphas = _pad(self.tokens, t, self.end_id, dim=2), _pad(self.alphas, t, 0, dim=2)
        self.rank, keep = torch.cat([self.rank, new_rank], dim=1).topk(k, dim=1)  # (N, k)
        self.tokens = _take(torch.cat([pool_tokens, new_tokens], dim=1), keep)
        self.alphas = _take(torch.cat([pool_alphas, new_alphas], dim=1), keep)
        # The k best unfinished candidates, in rank order (a stable sort puts the unfinished ones first).
        go_on = torch.sort(ends.int(), dim=1, stable=True).indices[:, :k]  # (N, k)
        words = _take(word, go_on)
        live.select(_take(beam, go_on), words, _take(top, go_on))
        return words

    def all_done(self, live: _Live, t: int, max_len: int) -> bool:
        self.done |= _cannot_beat(live.scores, t, max_len, self.length_norm, self.rank[:, -1])
        return bool(self.done.all())

    def result(self, live: _Live):
        return _or_best_live(self.tokens[:, 0], self.alphas[:, 0], self.rank[:, 0], live, self.length_norm, self.end_id)


def _pooled_search(live: _Live, max_len: int, end_id: int, length_norm: float, early_stop: bool):
    """The default search; returns per image the best caption's tokens (N,T), alphas (N,T,P), score (N,)."""
    pool = _Pool(live, end_id, length_norm)
    for t in range(1, max_len + 1):
        pool.advance(live, live.expand(), t)
        if early_stop and t < max_len and pool.all_done(live, t, max_len):
            break
    return pool.result(live)


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


# ------------------------------------------------------------------------------------------ decoding controls
SAMPLE_METHODS = ("greedy", "sample", "top-k", "top-p")
# self-critical.pytorch's list: SCST-trained models learn to end on these ("a man riding a"), which CIDEr barely punishes
BAD_ENDINGS = ("a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near", "to", "is",
               "are", "am")


@dataclass(frozen=True)
class DecodeControls:
    """How to decode beyond the plain beam search; the defaults change nothing.

    sample_method: greedy = the beam search (beam size 1: greedy decoding); sample = draw each word from the
    softmax at ``temperature``; top-k / top-p = draw from the k most likely words / the smallest set whose
    probability reaches p. ``sample_n`` captions per image (sampling), reproducible with ``seed``.
    beam_groups > 1: diverse beam search, the beams split into groups, each group's words penalized by
    ``diversity`` x the times earlier groups chose the same word at the same step; one caption per group.
    block_trigrams: no caption repeats a trigram. bad_ending_ids: word ids a caption may not end on.
    """

    sample_method: str = "greedy"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    sample_n: int = 1
    seed: int | None = None
    beam_groups: int = 1
    diversity: float = 0.5
    block_trigrams: bool = False
    bad_ending_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.sample_method not in SAMPLE_METHODS:
            raise ValueError(f"sample_method must be one of {SAMPLE_METHODS}, got {self.sample_method!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.sample_method == "top-k" and self.top_k < 1:
            raise ValueError(f"sample_method top-k needs top_k >= 1, got {self.top_k}")
        if self.sample_method == "top-p" and not 0 < self.top_p <= 1:
            raise ValueError(f"sample_method top-p needs 0 < top_p <= 1, got {self.top_p}")
        if self.sample_n < 1 or self.beam_groups < 1:
            raise ValueError(f"sample_n and beam_groups must be >= 1, got {self.sample_n} and {self.beam_groups}")
        if self.sample_n > 1 and not self.sampling:
            raise ValueError("sample_n > 1 draws several captions: choose a sample_method other than greedy")
        if self.beam_groups > 1 and self.sampling:
            raise ValueError("beam_groups is a beam search: use it with sample_method greedy")
        if self.diversity < 0:
            raise ValueError(f"diversity must be >= 0, got {self.diversity}")

    @property
    def sampling(self) -> bool:
        return self.sample_method != "greedy"

    def constraints(self, end_id: int) -> Constraints:
        return Constraints(end_id, self.block_trigrams, tuple(self.bad_ending_ids))


class Samples(NamedTuple):
    tokens: Tensor  # (R, T) int64 words, R = N images x n samples image-major, <end> from the end on
    lengths: Tensor  # (R,) words before <end> (the caption's length)
    finished: Tensor  # (R,) bool: emitted <end> (else cut at max_len)
    logprob: Tensor  # (R,) sum of the model's log-probabilities (temperature 1, incl. <end>) of what was drawn
    alphas: Tensor  # (R, T, P)


def _filter(logits: Tensor, method: str, top_k: int, top_p: float) -> Tensor:
    """logits (R, V) -> the same with the words outside the top-k / top-p set at -inf."""
    if method == "top-k":
        kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]  # (R, 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    if method == "top-p":
        ranked, order = logits.sort(dim=1, descending=True)
        probs = ranked.softmax(dim=1)
        outside = probs.cumsum(dim=1) - probs >= top_p  # the most likely word always stays
        return logits.masked_fill(torch.zeros_like(outside).scatter(1, order, outside), float("-inf"))
    return logits


@torch.no_grad()
def sample(encoded: Encoded, step: StepFn, n: int, max_len: int, start_id: int, end_id: int, method: str = "sample",
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           constraints: Constraints | None = None) -> Samples:
    """``n`` captions per image drawn word by word, all N*n rows in one step call per word (image-major).

    method greedy takes the most likely word (n identical rows); sample / top-k / top-p draw from the softmax of
    logprobs / temperature (restricted to the top-k / top-p words). ``generator`` seeds the draws (None: torch's
    global RNG). Stops when every row has ended, or after max_len words.
    """
    encoded = _check_args(encoded, max_len)
    if method not in SAMPLE_METHODS:
        raise ValueError(f"method must be one of {SAMPLE_METHODS}, got {method!r}")
    live = _Live(encoded, step, n, start_id, constraints)
    r = live.words.shape[0]
    dev = live.words.device
    finished = torch.zeros(r, dtype=torch.bool, device=dev)
    logprob = torch.zeros(r, device=dev)
    tokens, alphas = [], []
    for _ in range(max_len):
        logprobs, live.h, live.c, alpha = live.step_fn(live.words, live.h, live.c, encoded.enc_out, encoded.enc_att)
        logprobs = logprobs.float()  # (R, V)
        allowed = live.constrain(logprobs)
        if method == "greedy":
            word = allowed.argmax(dim=1)
        else:
            probs = _filter(allowed / temperature, method, top_k, top_p).softmax(dim=1)
            word = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (R,)
        word = word.masked_fill(finished, end_id)
        logprob += logprobs.gather(1, word[:, None])[:, 0].masked_fill(finished, 0.0)
        finished |= word == end_id
        tokens.append(word)
        alphas.append(alpha.float())
        live.words = word
        if live.constraints is not None:  # (N, n, t): what the constraints look at
            live.tokens = torch.stack(tokens, dim=1).view(encoded.h.shape[0], n, -1)
        if bool(finished.all()):
            break
    out = torch.stack(tokens, dim=1)  # (R, T)
    lengths = (out != end_id).long().cumprod(dim=1).sum(dim=1)  # (R,) words before the first <end>
    return Samples(out, lengths, finished, logprob, torch.stack(alphas, dim=1))


def _sampled_hypotheses(s: Samples, n: int) -> list[list[Hypothesis]]:
    tokens, lengths, scores, alphas = s.tokens.cpu(), s.lengths.cpu(), s.logprob.cpu(), s.alphas.cpu()
    hyps = [Hypothesis(tokens[i, : int(lengths[i])].tolist(), float(scores[i]), alphas[i, : int(lengths[i])])
            for i in range(len(tokens))]
    return [hyps[i : i + n] for i in range(0, len(hyps), n)]


@torch.no_grad()
def diverse_beam_search(encoded: Encoded, step: StepFn, beam_size: int, groups: int, diversity: float, max_len: int,
                        start_id: int, end_id: int, length_norm: float = 0.0,
                        constraints: Constraints | None = None) -> list[list[Hypothesis]]:
    """Diverse beam search (Vijayakumar et al. 2018): ``groups`` groups of beam_size / groups beams, each a default
    search whose candidates at step t lose ``diversity`` x (times an earlier group took that word at step t).
    Returns per image the best caption of each group, group order; scores include the penalties."""
    if groups < 1 or beam_size % groups:
        raise ValueError(f"beam_size ({beam_size}) must be a multiple of beam_groups ({groups})")
    encoded = _check_args(encoded, max_len, beam_size)
    lives = [_Live(encoded, step, beam_size // groups, start_id, constraints) for _ in range(groups)]
    pools = [_Pool(live, end_id, length_norm) for live in lives]
    for t in range(1, max_len + 1):
        taken = None  # (N, V) how often earlier groups chose each word at this step
        for live, pool in zip(lives, pools):
            cand = live.expand()  # (N, b, V)
            if taken is not None:
                cand = cand - diversity * taken[:, None, :]
            words = pool.advance(live, cand, t)  # (N, b)
            taken = torch.zeros(cand.shape[0], cand.shape[2], device=cand.device) if taken is None else taken
            taken.scatter_add_(1, words, torch.ones_like(words, dtype=taken.dtype))
        if t < max_len and all([pool.all_done(live, t, max_len) for live, pool in zip(lives, pools)]):
            break
    per_group = []
    for live, pool in zip(lives, pools):
        tokens, alphas, scores = (x.cpu() for x in pool.result(live))
        per_group.append([_hypothesis(tokens[i], float(scores[i]), alphas[i], end_id) for i in range(len(scores))])
    return [list(hyps) for hyps in zip(*per_group)]


def decode(encoded: Encoded, step: StepFn, beam_size: int, max_len: int, start_id: int, end_id: int,
           length_norm: float = 0.0, search: str = "default", controls: DecodeControls | None = None,
           ) -> list[list[Hypothesis]]:
    """The captions of each image under ``controls``: one (beam search), ``beam_groups`` (diverse beam search) or
    ``sample_n`` (sampling). Without controls: [[h] for h in beam_search(...)], exactly."""
    c = controls or DecodeControls()
    if search == "tutorial" and (c.sampling or c.beam_groups > 1):
        raise ValueError("search='tutorial' is the tutorial's beam search: it cannot sample or use beam groups")
    constraints = c.constraints(end_id)
    if c.sampling:
        generator = None
        if c.seed is not None:
            generator = torch.Generator(device=encoded.h.device).manual_seed(c.seed)
        s = sample(encoded, step, c.sample_n, max_len, start_id, end_id, c.sample_method, c.temperature, c.top_k,
                   c.top_p, generator, constraints)
        return _sampled_hypotheses(s, c.sample_n)
    if c.beam_groups > 1:
        return diverse_beam_search(encoded, step, beam_size, c.beam_groups, c.diversity, max_len, start_id, end_id,
                                   length_norm, constraints)
    hyps = beam_search(encoded, step, beam_size, max_len, start_id, end_id, length_norm, search=search,
                       constraints=constraints)
    return [[h] for h in hyps]


def bad_ending_ids(words: Sequence[str], word_to_id: Callable[[str], int | None]) -> tuple[int, ...]:
    """The ids of ``words`` that the vocabulary knows (a word it lacks can never be emitted anyway)."""
    ids = (word_to_id(w) for w in words)
    return tuple(sorted({i for i in ids if i is not None}))
