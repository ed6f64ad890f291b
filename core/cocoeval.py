"""The COCO caption evaluation (pycocoevalcap): PTB tokenizer, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D, SPICE.

These are the numbers captioning papers report (Show, Attend and Tell's tables, and every paper since): the same
scorers, the same tokenizer, called the way ``pycocoevalcap.eval.COCOEvalCap`` calls them.

    >>> s = coco_caption_scores({1: "a dog runs"}, {1: ["a dog runs", "the dog is running"]})
    >>> s.scores["bleu1"], s.unavailable.get("spice")

What runs where:
- Java found (``java`` on PATH): the Stanford PTB tokenizer (CoreNLP 3.4.1 jar bundled with pycocoevalcap) and
  METEOR 1.5 (bundled jar); every number is paper-comparable.
- no Java: a Python imitation of the PTB tokenizer (``fallback_tokenize``, stated in ``tokenizer``); BLEU, ROUGE-L
  and CIDEr-D still come out (pure Python scorers), METEOR and SPICE are reported unavailable.
- SPICE needs the Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on first use. Offline that download
  would fail or hang, so the jars are looked for first and SPICE is skipped with the reason when they are absent.
Imports no torch.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
LABELS = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
          "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "spice": "SPICE"}
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens dropped after PTB tokenization
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])
PTB_JAR = "stanford-corenlp-3.4.1.jar"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# PTB's main rules: clitics split off ("isn't" -> "is n't", "dog's" -> "dog 's"), punctuation its own token
_FALLBACK_RE = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-./&][a-z0-9]+)*|\.\.\.|--|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


class CocoEvalUnavailable(RuntimeError):
    """pycocoevalcap is not installed (it is in the project's dev extra)."""


@dataclass
class CocoScores:
    """Corpus scores (``scores``: metric -> value, METRICS names), and why the others are missing."""

    scores: dict[str, float]
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> one-line reason
    tokenizer: str = ""
    images: int = 0

    def _cells(self, column: bool) -> list[str]:
        """Each metric in the papers' order: its score, or why it is missing (labels padded for a column)."""
        cells = []
        for m in METRICS:
            label = f"{LABELS[m]:<8}" if column else LABELS[m]
            if m in self.scores:
                cells.append(f"{label} {self.scores[m]:.4f}")
            elif m in self.unavailable:
                why = self.unavailable[m]
                cells.append(f"{label} unavailable: {why}" if column else f"{label} unavailable ({why})")
        return cells

    def table(self) -> str:
        """One line per metric, the way the papers list them; missing ones with their reason."""
        return "\n".join([f"{'images':<8} {self.images}", f"{'tokens':<8} {self.tokenizer}", *self._cells(column=True)])

    def line(self) -> str:
        """The same on one line (training's log)."""
        return f"COCO caption metrics ({self.tokenizer}): " + " | ".join(self._cells(column=False))

    def to_dict(self) -> dict:
        return {"scores": self.scores, "unavailable": self.unavailable, "tokenizer": self.tokenizer,
                "images": self.images}

    @classmethod
    def from_dict(cls, d: dict) -> CocoScores:
        return cls(scores=dict(d["scores"]), unavailable=dict(d.get("unavailable", {})),
                   tokenizer=d.get("tokenizer", ""), images=int(d.get("images", 0)))


def package_dir() -> Path:
    spec = find_spec("pycocoevalcap.bleu.bleu")  # pycocoevalcap is a namespace package: look for a module
    if spec is None or spec.origin is None:
        raise CocoEvalUnavailable("pycocoevalcap is not installed: pip install pycocoevalcap (or ./launch.sh setup, "
                                  "which installs the dev extra)")
    return Path(spec.origin).parent.parent


def find_java() -> str | None:
    return shutil.which("java")


def spice_missing(pkg: Path) -> str | None:
    """Why SPICE cannot run here (None if it can), decided before pycocoevalcap would start a download."""
    lib = pkg / "spice" / "lib"
    absent = [j for j in SPICE_JARS if not (lib / j).is_file()]
    if not absent:
        return None
    return (f"skipped offline: needs {' and '.join(absent)} in {lib}/ (from {CORENLP_URL}; on a machine with "
            f"network: python -m pycocoevalcap.spice.get_stanford_models)")


def fallback_tokenize(text: str) -> str:
    """PTB-like tokenization in Python (no Java): lowercase, clitics and punctuation split, punctuation dropped."""
    tokens = (_BRACKETS.get(t, t) for t in _FALLBACK_RE.findall(text.lower()))
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], java: str, pkg: Path) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer (same jar, flags and punctuation filter), with its temporary file in the system
    temp directory rather than in the installed package (which may be read-only)."""
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps]
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines).encode())
    try:
        out = subprocess.run([java, "-cp", str(pkg / "tokenizer" / PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", f.name], capture_output=True, check=True, timeout=600)
    finally:
        os.unlink(f.name)
    tokenized = out.stdout.decode().split("\n")
    tokenized += [""] * (len(lines) - len(tokenized))  # trailing empty captions print no line
    result: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, tokenized):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION))
    return result


def _tokenize_all(gts, res, java: str | None, pkg: Path):
    if java is not None:
        try:  # one Java start for both sides
            both = ptb_tokenize({**{("g", k): v for k, v in gts.items()}, **{("r", k): v for k, v in res.items()}},
                                java, pkg)
            return ({k: both[("g", k)] for k in gts}, {k: both[("r", k)] for k in res},
                    "PTB (Stanford CoreNLP 3.4.1, Java)")
        except (OSError, subprocess.SubprocessError) as e:
            reason = f"the PTB tokenizer failed ({str(e).splitlines()[0][:120]})"
    else:
        reason = "no java on PATH"
    note = f"fallback: Python PTB imitation ({reason}; numbers may differ slightly from the papers')"
    tok = {k: [fallback_tokenize(c) for c in caps] for k, caps in gts.items()}
    return tok, {k: [fallback_tokenize(c) for c in caps] for k, caps in res.items()}, note


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR process per Python process: its start (loading the paraphrase table) costs seconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _java_metric(name: str, scorer_factory, gts, res) -> tuple[float | None, str]:
    """A Java-backed scorer, its failure turned into a reason instead of a traceback."""
    try:
        scorer = scorer_factory()
        score, _ = scorer.compute_score(gts, res)
        return float(score), ""
    except (OSError, subprocess.SubprocessError, ValueError, AssertionError, BrokenPipeError) as e:
        _meteor.cache_clear()  # a dead METEOR process is not reused
        return None, f"{name} failed: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"


def coco_caption_scores(hypotheses: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                        spice: bool = True) -> CocoScores:
    """Score raw (untokenized) captions: ``hypotheses[id]`` one caption, ``references[id]`` one or more.

    Same ids in both. Raises CocoEvalUnavailable without pycocoevalcap, ValueError for mismatched ids.
    """
    pkg = package_dir()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(hypotheses) != set(references):
        extra, lacking = set(hypotheses) - set(references), set(references) - set(hypotheses)
        raise ValueError(f"hypotheses and references must have the same ids: {len(extra)} without references "
                         f"(e.g. {sorted(map(str, extra))[:3]}), {len(lacking)} without a hypothesis "
                         f"(e.g. {sorted(map(str, lacking))[:3]})")
    if not hypotheses:
        raise ValueError("nothing to score: 0 images")
    if any(not refs for refs in references.values()):
        raise ValueError("every image needs at least one reference caption")
    java = find_java()
    gts, res, tokenizer = _tokenize_all(dict(references), {k: [h] for k, h in hypotheses.items()}, java, pkg)
    out = CocoScores({}, {}, tokenizer, len(hypotheses))
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.scores.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
    if java is None:
        out.unavailable["meteor"] = "needs Java (METEOR 1.5 is a jar): install a JRE, e.g. apt-get install " \
                                    "openjdk-17-jre-headless"
    else:
        score, why = _java_metric("METEOR", _meteor, gts, res)
        out.scores.update(meteor=score) if score is not None else out.unavailable.update(meteor=why)
    out.scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out.scores["cider"] = float(Cider().compute_score(gts, res)[0])
    _add_spice(out, gts, res, java, pkg, spice)
    return out


def _add_spice(out: CocoScores, gts, res, java: str | None, pkg: Path, enabled: bool) -> None:
    if not enabled:
        out.unavailable["spice"] = "not computed (--no-spice)"
        return
    if java is None:
        out.unavailable["spice"] = "needs Java (SPICE is a jar)"
        return
    missing = spice_missing(pkg)
    if missing:
        out.unavailable["spice"] = missing
        return
    from pycocoevalcap.spice.spice import Spice

    score, why = _java_metric("SPICE", Spice, gts, res)  # its jars are present: no download is attempted
    out.scores.update(spice=score) if score is not None else out.unavailable.update(spice=why)
