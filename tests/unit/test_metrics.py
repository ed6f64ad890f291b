"""BLEU and CIDEr-D against cases worked out by hand (the arithmetic is in the comments)."""

import math
import shutil

import pytest
from nltk.translate.bleu_score import sentence_bleu

from core.metrics import caption_metrics, cider_d, cider_d_per_image, corpus_bleu_scores


def toks(s: str) -> list[str]:
    return s.split()


# ----------------------------------------------------------------------------------------------------- BLEU
def test_bleu_identical_is_one():
    # every n-gram of the hypothesis is in the reference: p1..p4 = 1, c = r so BP = 1 -> all BLEU = 1
    hyp = toks("a man rides a red bike down the hill")
    scores = corpus_bleu_scores([hyp], [[hyp, toks("someone on a bicycle")]])
    assert scores == pytest.approx({"bleu1": 1.0, "bleu2": 1.0, "bleu3": 1.0, "bleu4": 1.0})


def test_bleu_clipped_precisions_and_brevity_penalty():
    # hyp "the cat sat on mat" (c = 5), ref "the cat sat on the mat" (r = 6)
    # p1: the cat sat on mat            -> 5/5
    # p2: the-cat cat-sat sat-on on-mat -> 3/4   (on-mat is not in the reference)
    # p3: the-cat-sat cat-sat-on sat-on-mat -> 2/3
    # p4: the-cat-sat-on cat-sat-on-mat -> 1/2
    # BP = exp(1 - r/c) = exp(1 - 6/5) = exp(-0.2) = 0.818730753
    # BLEU-1 = BP * 1                          = 0.818730753
    # BLEU-2 = BP * (1 * 3/4)^(1/2)            = BP * 0.866025 = 0.709041631
    # BLEU-3 = BP * (1 * 3/4 * 2/3)^(1/3)      = BP * 0.5^(1/3) = 0.649827029
    # BLEU-4 = BP * (1 * 3/4 * 2/3 * 1/2)^(1/4) = BP * 0.25^(1/4) = 0.578930067
    scores = corpus_bleu_scores([toks("the cat sat on mat")], [[toks("the cat sat on the mat")]])
    assert scores["bleu1"] == pytest.approx(0.818730753, abs=1e-9)
    assert scores["bleu2"] == pytest.approx(0.709041631, abs=1e-9)
    assert scores["bleu3"] == pytest.approx(0.649827029, abs=1e-9)
    assert scores["bleu4"] == pytest.approx(0.578930067, abs=1e-9)


def test_bleu_is_corpus_level_with_clipping():
    # sentence 1 as above: matches/counts  p1 5/5, p2 3/4, p3 2/3, p4 1/2;  c = 5, closest r = 6
    # sentence 2: hyp "a a a dog" (c = 4), refs "a dog barks" / "a big dog" (both 3 -> r = 3)
    #   max count in any reference: a 1, dog 1 -> clipped unigrams a min(3,1)=1 + dog 1 -> 2/4
    #   bigrams a-a, a-a, a-dog: only a-dog is in a reference -> 1/3
    #   trigrams a-a-a, a-a-dog -> 0/2;  4-gram a-a-a-dog -> 0/1
    # corpus sums: p1 = 7/9, p2 = 4/7, p3 = 2/5, p4 = 1/3;  c = 9, r = 9 -> BP = 1
    # BLEU-1 = 7/9 = 0.777777778
    # BLEU-2 = (7/9 * 4/7)^(1/2) = (4/9)^(1/2) = 2/3
    # BLEU-3 = (4/9 * 2/5)^(1/3) = (8/45)^(1/3) = 0.562288444
    # BLEU-4 = (8/45 * 1/3)^(1/4) = (8/135)^(1/4) = 0.493388536
    hyps = [toks("the cat sat on mat"), toks("a a a dog")]
    refs = [[toks("the cat sat on the mat")], [toks("a dog barks"), toks("a big dog")]]
    scores = corpus_bleu_scores(hyps, refs)
    assert scores["bleu1"] == pytest.approx(7 / 9, abs=1e-12)
    assert scores["bleu2"] == pytest.approx(2 / 3, abs=1e-12)
    assert scores["bleu3"] == pytest.approx((8 / 45) ** (1 / 3), abs=1e-12)
    assert scores["bleu4"] == pytest.approx((8 / 135) ** (1 / 4), abs=1e-12)
    assert (8 / 45) ** (1 / 3) == pytest.approx(0.562288444) and (8 / 135) ** 0.25 == pytest.approx(0.493388536)


def test_bleu_single_sentence_matches_nltk_sentence_bleu():
    hyp = toks("a brown dog is running on the green grass")
    refs = [toks("a brown dog runs through the grass"), toks("the dog is running on green grass outside")]
    scores = corpus_bleu_scores([hyp], [refs])
    weights = [(1, 0, 0, 0), (0.5, 0.5, 0, 0), (1 / 3, 1 / 3, 1 / 3, 0), (0.25, 0.25, 0.25, 0.25)]
    for n, w in enumerate(weights, start=1):
        assert scores[f"bleu{n}"] == pytest.approx(sentence_bleu(refs, hyp, weights=w), rel=1e-12)


def test_bleu_empty_hypotheses_do_not_crash():
    # all empty: nothing matches -> 0 for every order (exactly, nltk returns 0 when no unigram matches)
    assert corpus_bleu_scores([[], []], [[toks("a b")], [toks("c")]]) == {f"bleu{n}": 0.0 for n in range(1, 5)}
    # one empty, one identical: nltk adds max(1, count) = 1 to each denominator for the empty hypothesis
    # p1 = (0 + 2) / (1 + 2) = 2/3; c = 0 + 2, r = 2 + 2 -> BP = exp(1 - 4/2) = exp(-1)
    # BLEU-1 = exp(-1) * 2/3 = 0.245252961;  p3 has no match -> BLEU-3, BLEU-4 numerically 0
    scores = corpus_bleu_scores([[], toks("a b")], [[toks("a b")], [toks("a b")]])
    assert scores["bleu1"] == pytest.approx(math.exp(-1) * 2 / 3, abs=1e-12)
    assert scores["bleu3"] < 1e-70 and scores["bleu4"] < 1e-70


def test_bleu_no_higher_order_match_is_numerically_zero_without_smoothing():
    scores = corpus_bleu_scores([toks("a dog runs")], [[toks("a dog runs")]])  # no 4-grams at all
    assert scores["bleu3"] == pytest.approx(1.0)
    assert 0.0 <= scores["bleu4"] < 1e-70


# ----------------------------------------------------------------------------------------------------- CIDEr-D
def test_cider_perfect_match_with_distinct_images_is_ten():
    # 2 images with disjoint vocabularies: every reference n-gram has df = 1,
    # idf = log(2) - log(1) = log 2 > 0. The hypothesis equals all its references, so for each order
    # 1..4 the tf-idf vectors are equal: cosine 1, no clipping loss, length penalty exp(0) = 1.
    # score = 10 * mean_n(1) = 10 for each image -> corpus 10
    refs = [[toks("a b c d"), toks("a b c d")], [toks("e f g h")]]
    hyps = [toks("a b c d"), toks("e f g h")]
    assert cider_d_per_image(hyps, refs) == pytest.approx([10.0, 10.0])
    assert cider_d(hyps, refs) == pytest.approx(10.0)


def test_cider_single_image_corpus_is_zero():
    # one image: idf = log(1) - log(max(1, df)) = 0 for every n-gram -> all vectors are 0 -> score 0
    # (same as the coco-caption reference implementation; CIDEr-D needs a corpus)
    assert cider_d([toks("a dog runs")], [[toks("a dog runs")]]) == 0.0


# Two-image corpus used below. N = 2 images, L = log(2).
#   image 0 refs: "a cat sits", "a cat sleeps"      image 1 refs: "a dog runs"
# df over images (each image's reference n-grams counted once, hypotheses never count):
#   a: 2 -> idf = L - log 2 = 0;   every other reference n-gram: df 1 -> idf L;
#   n-grams in no reference (e.g. "dog sits"): df 0 -> idf = L - log(max(1, 0)) = L.
REFS = [[toks("a cat sits"), toks("a cat sleeps")], [toks("a dog runs")]]


def test_cider_two_image_corpus_by_hand():
    # image 0, hyp "a cat sleeps" (same length as both refs -> penalty 1):
    #   vs "a cat sits":   n=1 hyp {a:0, cat:L, sleeps:L} ref {a:0, cat:L, sits:L}, |h| = |r| = L*sqrt2,
    #                      dot = min(L,L)*L (cat) = L^2  -> 1/2
    #                      n=2 {a-cat:L, cat-sleeps:L} vs {a-cat:L, cat-sits:L} -> 1/2
    #                      n=3 {a-cat-sleeps} vs {a-cat-sits} -> 0;   n=4 no 4-grams -> 0
    #   vs "a cat sleeps": identical -> n=1..3: 1, n=4: 0
    #   mean over n of the sum over refs: (1.5 + 1.5 + 1 + 0) / 4 = 1;  / 2 refs = 0.5;  x10 -> 5.0
    # image 1, hyp "a dog sits" vs "a dog runs":
    #   n=1 {a:0, dog:L, sits:L} vs {a:0, dog:L, runs:L} -> L^2 / (2 L^2) = 1/2
    #       (sits has df 1 from image 0's refs; had hypotheses counted, df = 2 and this would be 1/sqrt2)
    #   n=2 {a-dog:L, dog-sits:L (df 0)} vs {a-dog:L, dog-runs:L} -> 1/2;  n=3: 0; n=4: 0
    #   (0.5 + 0.5 + 0 + 0) / 4 = 0.25;  / 1 ref;  x10 -> 2.5
    # corpus: (5.0 + 2.5) / 2 = 3.75
    # (with df counted per reference instead of per image, df(cat) = 2 -> idf 0 and image 0 would differ)
    hyps = [toks("a cat sleeps"), toks("a dog sits")]
    assert cider_d_per_image(hyps, REFS) == pytest.approx([5.0, 2.5], abs=1e-12)
    assert cider_d(hyps, REFS) == pytest.approx(3.75, abs=1e-12)


def test_cider_length_penalty_by_hand():
    # image 1, hyp "a dog runs fast" (4 tokens) vs ref "a dog runs" (3): delta = 1,
    # penalty = exp(-1 / (2 * 6^2)) = exp(-1/72) = 0.986207117
    #   n=1 hyp {a:0, dog:L, runs:L, fast:L} |h| = L*sqrt3; ref {a:0, dog:L, runs:L} |r| = L*sqrt2
    #       dot = 2 L^2 -> 2/sqrt6 = 0.816496581
    #   n=2 hyp {a-dog, dog-runs, runs-fast} all L, |h| = L*sqrt3; ref {a-dog, dog-runs} -> 2/sqrt6
    #   n=3 hyp {a-dog-runs, dog-runs-fast} |h| = L*sqrt2; ref {a-dog-runs} |r| = L -> 1/sqrt2 = 0.707106781
    #   n=4 ref has no 4-gram -> 0
    #   10 * penalty * (2 * 0.816496581 + 0.707106781 + 0) / 4 = 5.769558044
    # image 0 as in the previous test: 5.0 -> corpus (5.0 + 5.769558044) / 2 = 5.384779022
    hyps = [toks("a cat sleeps"), toks("a dog runs fast")]
    per_image = cider_d_per_image(hyps, REFS)
    assert per_image == pytest.approx([5.0, 5.769558044], abs=1e-9)
    assert cider_d(hyps, REFS) == pytest.approx(5.384779022, abs=1e-9)


def test_cider_clips_repeated_ngrams():
    # refs: image 0 "the cat", image 1 "a dog" (disjoint -> every ref n-gram has idf L)
    # image 0 hyp "cat cat": n=1 hyp {cat: 2L} |h| = 2L; ref {the:L, cat:L} |r| = L*sqrt2
    #   clipped dot = min(2L, L) * L = L^2 -> L^2 / (2L * L*sqrt2) = 1/(2 sqrt2) = 0.353553391
    #   (unclipped it would be 2L^2 / (2 sqrt2 L^2) = 1/sqrt2)
    #   n=2 {cat-cat: L} vs {the-cat: L} -> 0;  n=3, n=4: no n-grams -> 0;  delta = 0
    #   10 * 0.353553391 / 4 = 0.883883476
    refs = [[toks("the cat")], [toks("a dog")]]
    hyps = [toks("cat cat"), toks("a dog")]
    assert cider_d_per_image(hyps, refs)[0] == pytest.approx(0.883883476, abs=1e-9)


def test_cider_empty_hypothesis_scores_zero_without_crash():
    refs = [[toks("a b c d")], [toks("e f g h")]]
    assert cider_d_per_image([[], toks("e f g h")], refs) == pytest.approx([0.0, 10.0])


# ----------------------------------------------------------------------------------------------------- API
def test_caption_metrics_combines_both():
    hyps = [toks("a cat sleeps"), toks("a dog sits")]
    out = caption_metrics(hyps, REFS)
    assert set(out) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
    assert out["cider"] == pytest.approx(3.75)
    assert {k: v for k, v in out.items() if k != "cider"} == corpus_bleu_scores(hyps, REFS)


@pytest.mark.parametrize("fn", [corpus_bleu_scores, cider_d, caption_metrics])
def test_length_mismatch_names_both_lengths(fn):
    with pytest.raises(ValueError, match=r"3 hypotheses but 2 reference"):
        fn([["a"], ["b"], ["c"]], [[["a"]], [["b"]]])


@pytest.mark.parametrize("fn", [corpus_bleu_scores, cider_d, caption_metrics])
def test_image_without_references_names_index(fn):
    with pytest.raises(ValueError, match=r"image 1 has no references"):
        fn([["a"], ["b"]], [[["a"]], []])


def test_untokenized_input_is_rejected():
    with pytest.raises(TypeError, match="hypothesis 0 is a str"):
        cider_d(["a dog"], [[["a", "dog"]]])
    with pytest.raises(TypeError, match="reference 0 of image 0 is a str"):
        corpus_bleu_scores([["a", "dog"]], [["a dog"]])
    with pytest.raises(ValueError, match="empty corpus"):
        caption_metrics([], [])


# ------------------------------------------------------------------------------- CIDEr-D against the reference
GOLDEN_HYPS = [
    "a dog runs on the grass",
    "two children play in the water",
    "a man rides a bike",
    "a red circle above a blue square",
    "",
    "a dog a dog a dog",
]
GOLDEN_REFS = [
    ["a brown dog runs across the grass", "a dog is running on green grass", "the dog runs"],
    ["two kids splash in the water", "children are playing in a pool", "two children swim", "kids in water"],
    ["a man riding a bicycle down the street", "a cyclist on a road"],
    ["a red circle is above a blue square", "a blue square below a red circle", "red circle , blue square"],
    ["a cat sleeps", "a cat is sleeping on a bed"],
    ["a dog plays with a ball", "a dog"],
]


def test_cider_d_equals_the_coco_caption_reference():
    """Golden values from pycocoevalcap's CiderD scorer (pure Python; its Java tokenizer is not used: the
    captions here are already tokenized and space-joined)."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    gts = {i: refs for i, refs in enumerate(GOLDEN_REFS)}
    res = {i: [hyp] for i, hyp in enumerate(GOLDEN_HYPS)}
    mean, per_image = cider.Cider().compute_score(gts, res)
    hyps = [h.split() for h in GOLDEN_HYPS]
    refs = [[r.split() for r in rs] for rs in GOLDEN_REFS]
    assert cider_d_per_image(hyps, refs) == pytest.approx(list(per_image), abs=1e-6)
    assert cider_d(hyps, refs) == pytest.approx(mean, abs=1e-6)
    assert mean > 0.1  # a corpus with real matches, not a trivial zero


# ----------------------------------------------------- the full COCO caption metrics against pycocoevalcap itself
RAW_HYPS = ["A dog runs on the grass.", "Two children play in the water!", "a man (left) rides a bike",
            "A red circle above a blue square", "", "a dog's ball, a dog's bone", "The cat isn't sleeping."]
RAW_REFS = [GOLDEN_REFS[0], GOLDEN_REFS[1], GOLDEN_REFS[2], GOLDEN_REFS[3],
            ["A cat sleeps.", "A cat is sleeping on a bed."], ["A dog plays with a ball.", "a dog"],
            ["The cat is not asleep!", "a cat, awake, on a sofa"]]


def _reference_coco_scores() -> tuple[dict[str, float], dict, dict]:
    """What pycocoevalcap's COCOEvalCap.evaluate computes (its PTBTokenizer, then each scorer), SPICE left out:
    COCOEvalCap would start SPICE's CoreNLP download, which cannot run offline."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(RAW_REFS)})
    res = PTBTokenizer().tokenize({i: [{"caption": h}] for i, h in enumerate(RAW_HYPS)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{i + 1}": b for i, b in enumerate(bleu)}
    out["meteor"] = Meteor().compute_score(gts, res)[0]
    out["rouge_l"] = Rouge().compute_score(gts, res)[0]
    out["cider"] = Cider().compute_score(gts, res)[0]
    return out, gts, res


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference PTB tokenizer and METEOR need Java")
def test_reported_coco_metrics_equal_pycocoevalcap():
    """Golden test: core.cocoeval's numbers are pycocoevalcap's own (same tokens, same scorers), and our CIDEr-D
    (core.metrics, used per epoch) equals pycocoevalcap's on the PTB tokens to 1e-6."""
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    from core.cocoeval import coco_caption_scores

    expected, gts, res = _reference_coco_scores()
    got = coco_caption_scores(dict(enumerate(RAW_HYPS)), dict(enumerate(RAW_REFS)))
    assert got.tokenizer.startswith("PTB")
    for name, value in expected.items():
        assert got.scores[name] == pytest.approx(value, abs=1e-12), name
    assert "spice" in got.unavailable and "stanford-corenlp-3.6.0" in got.unavailable["spice"]
    assert 0.1 < expected["cider"] and 0.05 < expected["bleu4"] < expected["bleu1"] < 1  # real matches, not zeros
    ours = cider_d([res[i][0].split() for i in res], [[r.split() for r in gts[i]] for i in gts])
    assert ours == pytest.approx(expected["cider"], abs=1e-6)


def test_the_fallback_tokenizer_imitates_ptb_on_common_cases():
    """Without Java, captions are tokenized by a Python imitation of PTB: these are PTB's outputs (checked with
    the jar: lowercase, clitics split, brackets as -lrb-/-rrb-, punctuation dropped)."""
    from core.cocoeval import fallback_tokenize

    assert fallback_tokenize("A dog's ball, red.") == "a dog 's ball red"
    assert fallback_tokenize("The man (left) isn't here!") == "the man -lrb- left -rrb- is n't here"
    assert fallback_tokenize("") == ""
