"""Fast caption metrics for training: corpus BLEU-1..4 (through nltk) and CIDEr-D, on our regex tokens.

Which numbers are which:
- these (``caption_metrics``) drive training: the per-epoch val BLEU-4 that picks best.pt, the LR plateau and early
  stopping, and the quick figures of ``export.caption --data``. Pure Python, no Java, about a second for 600
  images. NOT paper-comparable: nltk's BLEU on core.vocab's regex tokens is not coco-caption's BLEU on PTB tokens
  (brevity penalty and tokenization differ slightly).
- the paper-comparable numbers (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE as every captioning paper reports them)
  come from core.cocoeval (pycocoevalcap): ``python -m core.evaluate`` and training's final test report.
- ``cider_d`` here equals pycocoevalcap's CIDEr-D to 1e-6 on the same tokens (golden tests in tests/test_metrics.py).

All functions take already tokenized text:

    hypotheses: list[list[str]]          one generated caption per image
    references: list[list[list[str]]]    one or more reference captions per image

    >>> from core.metrics import caption_metrics
    >>> caption_metrics([["a", "dog", "runs"]], [[["a", "dog", "runs"]]])["bleu1"]
    1.0

BLEU conventions (nltk ``corpus_bleu``, as the Show-Attend-Tell tutorial and coco-caption report it):
- corpus level: clipped n-gram matches and hypothesis n-gram counts are summed over the corpus before the
  division; the brevity penalty uses the sum over images of the reference length closest to each hypothesis.
- BLEU-n is cumulative: the geometric mean of p_1..p_n with uniform weights (1/n each).
- no smoothing by default. If an order with a positive weight has no match in the whole corpus, the score is
  (numerically) zero: nltk substitutes ``sys.float_info.min`` for the zero precision, so the value is a tiny
  positive number (< 1e-70), not exactly 0.0. nltk's warning about this is silenced here. Pass
  ``smoothing=nltk.translate.bleu_score.SmoothingFunction().method1`` (or any nltk method) to smooth.
- nltk quirk kept as is: a hypothesis with fewer than n tokens still adds 1 (not 0) to the n-gram denominator.
- empty hypotheses are allowed: they match nothing, count as length 0 for the brevity penalty, and a corpus of
  only empty hypotheses scores 0.0.

CIDEr-D conventions (Vedantam et al. 2015, the coco-caption ``Cider`` scorer, which is CIDEr-D):
- n-grams of order 1..n (n=4), raw n-gram counts as term frequency.
- document frequency df(g) = number of images whose reference set contains g, computed over the references of
  the evaluated corpus only (hypotheses never count). idf(g) = log(num_images) - log(max(1, df(g))).
  Consequence shared with the reference implementation: a corpus of ONE image scores 0 (every idf is 0).
- per order k and per reference r: clipped cosine
  sum_g min(v_hyp[g], v_ref[g]) * v_ref[g] / (|v_hyp| * |v_ref|)  (0 when either vector is 0),
  multiplied by the gaussian length penalty exp(-(len_hyp - len_ref)^2 / (2 sigma^2)), sigma = 6.
- score(image) = 10 * mean over orders of the mean over references; CIDEr-D = mean over images.
- lengths are token counts. (The reference code counts bigrams, i.e. length - 1; the difference between two
  lengths is the same unless a caption is empty, and then every similarity is 0 anyway, so scores agree.)
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

from nltk.translate.bleu_score import corpus_bleu

__all__ = ["corpus_bleu_scores", "cider_d", "cider_d_per_image", "caption_metrics", "CiderD", "sentence_bleu4"]

Tokens = Sequence[str]

# cumulative BLEU-n weights: uniform over orders 1..n
BLEU_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0, 0.0, 0.0, 0.0),
    (0.5, 0.5, 0.0, 0.0),
    (1.0 / 3, 1.0 / 3, 1.0 / 3, 0.0),
    (0.25, 0.25, 0.25, 0.25),
)


def _check_corpus(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> None:
    """Raise ValueError/TypeError for inputs that nltk or CIDEr-D would silently misread."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"got {len(hypotheses)} hypotheses but {len(references)} reference sets; "
            "there must be exactly one reference set per hypothesis"
        )
    if len(hypotheses) == 0:
        raise ValueError("cannot score an empty corpus (0 hypotheses)")
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
        if isinstance(hyp, str):
            raise TypeError(f"hypothesis {i} is a str; expected a list of tokens (tokenize it first)")
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {i} has no references (got {refs!r}); every image needs at least one")
        for j, ref in enumerate(refs):
            if isinstance(ref, str):
                raise TypeError(
                    f"reference {j} of image {i} is a str; expected a list of tokens "
                    "(references are list[list[list[str]]])"
                )


def corpus_bleu_scores(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    smoothing: Callable | None = None,
) -> dict[str, float]:
    """Corpus BLEU-1..4 as ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}`` (values in [0, 1]).

    ``smoothing`` is an nltk ``SmoothingFunction`` method; None (default) means no smoothing.
    """
    _check_corpus(hypotheses, references)
    hyps = [list(h) for h in hypotheses]
    refs = [[list(r) for r in rs] for rs in references]
    with warnings.catch_warnings():
        # nltk warns once per zero-count order when no smoothing is used; the score itself says it.
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        scores = corpus_bleu(refs, hyps, weights=list(BLEU_WEIGHTS), smoothing_function=smoothing)
    if not isinstance(scores, list):  # nltk returns a bare 0 when nothing matches at all
        scores = [scores] * len(BLEU_WEIGHTS)
    return {f"bleu{i + 1}": float(s) for i, s in enumerate(scores)}


def _ngram_counts(tokens: Tokens, n: int) -> list[Counter]:
    """Counts of the n-grams of each order 1..n: result[k-1] maps k-gram tuples to counts."""
    return [Counter(tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, n + 1)]


def _tfidf(counts: list[Counter], df: Counter, log_num_images: float) -> tuple[list[dict], list[float]]:
    """TF-IDF vectors (one dict per order) and their L2 norms."""
    vecs, norms = [], []
    for order_counts in counts:
        vec = {g: tf * (log_num_images - math.log(max(1.0, df[g]))) for g, tf in order_counts.items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms


class CiderD:
    """CIDEr-D with document frequencies fixed once from a reference corpus (SCST scores samples against the
    training split's: ``CiderD(train_references)``, then ``scorer.score(hyps, image_indices)`` per batch).

    The corpus's reference vectors are computed once (lazily, per image) and reused by every call, so a batch
    costs only its hypotheses' n-grams and one sparse dot product per reference and order.
    """

    def __init__(self, references: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(references) == 0:
            raise ValueError("CiderD needs at least one image's references")
        self.references, self.n, self.sigma = references, n, sigma
        self._ref_counts = [[_ngram_counts(r, n) for r in refs] for refs in references]
        # document frequency: in how many images' reference sets each n-gram occurs
        self.df: Counter = Counter()
        for per_ref in self._ref_counts:
            self.df.update({g for counts in per_ref for order_counts in counts for g in order_counts})
        self.log_num_images = math.log(len(references))
        self._ref_vecs: dict[int, list[tuple[list[dict], list[float], int]]] = {}

    def _refs(self, i: int) -> list[tuple[list[dict], list[float], int]]:
        """Image i's references as (tf-idf vectors, norms, length), computed on first use."""
        if i not in self._ref_vecs:
            self._ref_vecs[i] = [(*_tfidf(counts, self.df, self.log_num_images), len(ref))
                                 for ref, counts in zip(self.references[i], self._ref_counts[i], strict=True)]
        return self._ref_vecs[i]

    def score(self, hypotheses: Sequence[Tokens], images: Sequence[int]) -> list[float]:
        """CIDEr-D (x10) of each hypothesis against the references of corpus image ``images[j]``."""
        if len(hypotheses) != len(images):
            raise ValueError(f"got {len(hypotheses)} hypotheses but {len(images)} image indices")
        n, two_sigma2 = self.n, 2.0 * self.sigma * self.sigma
        scores = []
        for hyp, i in zip(hypotheses, images, strict=True):
            vec_h, norm_h = _tfidf(_ngram_counts(hyp, n), self.df, self.log_num_images)
            refs = self._refs(int(i))
            total = 0.0  # similarity summed over orders and references
            for vec_r, norm_r, ref_len in refs:
                delta = len(hyp) - ref_len
                penalty = math.exp(-(delta * delta) / two_sigma2)
                for k in range(n):
                    if norm_h[k] == 0.0 or norm_r[k] == 0.0:
                        continue
                    hk, rk = vec_h[k], vec_r[k]
                    # the "-D" clipping: a hypothesis n-gram weighs at most what it weighs in the reference
                    dot = sum(min(v, rk[g]) * rk[g] for g, v in hk.items() if g in rk)
                    total += penalty * dot / (norm_h[k] * norm_r[k])
            scores.append(10.0 * total / n / len(refs))
        return scores


def sentence_bleu4(hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]) -> list[float]:
    """BLEU-4 of each hypothesis alone (nltk sentence_bleu, smoothing method 1: a short sample is not 0)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    return [float(sentence_bleu([list(r) for r in refs], list(h), smoothing_function=smooth)) if h else 0.0
            for h, refs in zip(hypotheses, references, strict=True)]


def cider_d_per_image(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """CIDEr-D of each image (already x10); ``cider_d`` is their mean. See the module docstring."""
    _check_corpus(hypotheses, references)
    return CiderD(references, n=n, sigma=sigma).score(hypotheses, range(len(hypotheses)))


def cider_d(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D (mean over images of the per-image score, x10 scale as coco-caption)."""
    scores = cider_d_per_image(hypotheses, references, n=n, sigma=sigma)
    return sum(scores) / len(scores)


def caption_metrics(
    hypotheses: Sequence[Tokens],
    references: Sequence[Sequence[Tokens]],
) -> dict[str, float]:
    """``{"bleu1", "bleu2", "bleu3", "bleu4", "cider"}`` for a tokenized corpus."""
    out = corpus_bleu_scores(hypotheses, references)
    out["cider"] = cider_d(hypotheses, references)
    return out
