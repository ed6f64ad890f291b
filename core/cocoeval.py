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
- Every exchange with a Java process has a deadline (``java_timeout_s``: one METEOR request and its answer, one
  tokenizer run, one SPICE run): METEOR is driven here over the jar's own ``-stdio`` protocol (the requests
  pycocoevalcap's ``Meteor`` sends), because that class waits forever on a process that died (its lock is kept when
  an error interrupts it, and its ``__del__`` waits on the same lock). A Java tool that dies, hangs or answers
  nonsense becomes one reason line (``METEOR failed: ...``), never a hang or a traceback.
Imports no torch.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
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
METEOR_JAR = "meteor-1.5.jar"
SPICE_JAR = "spice-1.0.jar"
JAVA_TIMEOUT_S = 300.0  # one exchange with a Java tool; METEOR's first includes its start (~25 s on a busy 2-core)
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_URL = "http://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
# PTB's main rules: clitics split off ("isn't" -> "is n't", "dog's" -> "dog 's"), punctuation its own token
_FALLBACK_RE = re.compile(r"[a-z0-9]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-./&][a-z0-9]+)*|\.\.\.|--|\S")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}


class CocoEvalUnavailable(RuntimeError):
    """pycocoevalcap is not installed (it is in the project's dev extra)."""


class JavaToolError(RuntimeError):
    """A Java scorer died, gave no answer within its deadline, or answered something else (message: one line)."""


@dataclass
class CocoScores:
    """Corpus scores (``scores``: metric -> value, METRICS names), and why the others are missing."""

    scores: dict[str, float]
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> one-line reason
    tokenizer: str = ""
    images: int = 0
    failed: list[str] = field(default_factory=list)  # the unavailable metrics whose tool broke (not just absent)

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
                "images": self.images, "failed": self.failed}

    @classmethod
    def from_dict(cls, d: dict) -> CocoScores:
        return cls(scores=dict(d["scores"]), unavailable=dict(d.get("unavailable", {})),
                   tokenizer=d.get("tokenizer", ""), images=int(d.get("images", 0)), failed=list(d.get("failed", [])))


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


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], java: str, pkg: Path,
                 timeout_s: float = JAVA_TIMEOUT_S) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer (same jar, flags and punctuation filter), with its temporary file in the system
    temp directory rather than in the installed package (which may be read-only), always removed, and a deadline."""
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [_LINE_BREAKS.sub(" ", c) for caps in captions.values() for c in caps]
    data = "\n".join(lines).encode("utf-8", "replace")  # before the file exists: a lone surrogate becomes '?'
    fd, name = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        out = subprocess.run([java, "-cp", str(pkg / "tokenizer" / PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
                              "-preserveLines", "-lowerCase", name], capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise JavaToolError(f"no answer within {timeout_s:g} s") from None
    finally:
        os.unlink(name)
    if out.returncode != 0:
        raise JavaToolError(f"exit status {out.returncode}{_last_line(out.stderr)}")
    tokenized = out.stdout.decode("utf-8", "replace").split("\n")
    tokenized += [""] * (len(lines) - len(tokenized))  # trailing empty captions print no line
    result: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, tokenized):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION))
    return result


def _last_line(stderr: bytes, limit: int = 160) -> str:
    """``": <last non-empty line of a tool's stderr>"`` (truncated), or "" when it said nothing."""
    lines = [ln.strip() for ln in stderr[-4096:].decode("utf-8", "replace").splitlines() if ln.strip()]
    return f": {lines[-1][:limit]}" if lines else ""


def _tokenize_all(gts, res, java: str | None, pkg: Path, timeout_s: float):
    if java is not None:
        try:  # one Java start for both sides
            both = ptb_tokenize({**{("g", k): v for k, v in gts.items()}, **{("r", k): v for k, v in res.items()}},
                                java, pkg, timeout_s)
            return ({k: both[("g", k)] for k in gts}, {k: both[("r", k)] for k in res},
                    "PTB (Stanford CoreNLP 3.4.1, Java)")
        except (OSError, JavaToolError) as e:
            reason = f"the PTB tokenizer failed ({_one_line(e, 120)})"
    else:
        reason = "no java on PATH"
    note = f"fallback: Python PTB imitation ({reason}; numbers may differ slightly from the papers')"
    tok = {k: [fallback_tokenize(c) for c in caps] for k, caps in gts.items()}
    return tok, {k: [fallback_tokenize(c) for c in caps] for k, caps in res.items()}, note


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class JavaProcess:
    """A Java tool answering lines on stdin with lines on stdout, each exchange under a deadline.

    The pipes are read and written without blocking (select with the time left), so a process that stops
    reading, stops answering or dies ends the exchange with :class:`JavaToolError` instead of a wait without end.
    Its stderr goes to an anonymous temporary file (nothing left on disk; its last line explains a death).
    """

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        os.set_blocking(self._in, False)
        os.set_blocking(self._out, False)
        self._buffer = b""

    def ask(self, line: str, answers: int, timeout_s: float) -> list[str]:
        """Send one request line; return the next ``answers`` lines, all within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        self._send((line.replace("\n", " ") + "\n").encode("utf-8", "replace"), deadline, timeout_s)
        return [self._readline(deadline, timeout_s) for _ in range(answers)]

    def _wait(self, fd: int, write: bool, deadline: float, timeout_s: float) -> None:
        left = deadline - time.monotonic()
        ready = select.select([], [fd], [], max(left, 0))[1] if write else select.select([fd], [], [], max(left, 0))[0]
        if not ready:
            raise JavaToolError(f"no answer within {timeout_s:g} s (the Java process is stuck)")

    def _send(self, data: bytes, deadline: float, timeout_s: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._in, True, deadline, timeout_s)
            try:
                view = view[os.write(self._in, view):]
            except BrokenPipeError:
                raise self._died() from None
            except BlockingIOError:
                continue

    def _readline(self, deadline: float, timeout_s: float) -> str:
        while b"\n" not in self._buffer:
            self._wait(self._out, False, deadline, timeout_s)
            try:
                chunk = os.read(self._out, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise self._died()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").strip()

    def _died(self) -> JavaToolError:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return JavaToolError("the Java process closed its pipes")
        self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, self._stderr.tell() - 4096))
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return JavaToolError(f"the Java process ended ({how}){_last_line(self._stderr.read())}")

    def close(self) -> None:
        """Kill the process (a tool in the middle of an answer cannot be asked to stop) and release its pipes."""
        self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # unkillable (D state): leave it to the kernel; nothing here waits on it
        for f in (self.proc.stdin, self.proc.stdout, self._stderr):
            try:
                f.close()
            except OSError:
                pass


@functools.lru_cache(maxsize=1)
def _meteor(java: str, pkg: Path) -> JavaProcess:
    """One METEOR process per Python process: its start (loading the paraphrase table) costs seconds."""
    proc = JavaProcess([java, "-jar", "-Xmx2G", METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"], pkg / "meteor")
    atexit.register(proc.close)
    return proc


def meteor_score(gts, res, java: str, pkg: Path, timeout_s: float = JAVA_TIMEOUT_S) -> float:
    """Corpus METEOR 1.5 by pycocoevalcap's requests (one SCORE line per image, then one EVAL line); any failure
    kills the process, so the next call starts a fresh one."""
    meteor = _meteor(java, pkg)
    try:
        stats = []
        for k in gts:  # SCORE ||| reference 1 ||| ... ||| reference n ||| hypothesis
            hypothesis = res[k][0].replace("|||", "").replace("  ", " ")
            stats.append(meteor.ask(" ||| ".join(("SCORE", " ||| ".join(gts[k]), hypothesis)), 1, timeout_s)[0])
        answers = meteor.ask(" ||| ".join(("EVAL", *stats)), len(stats) + 1, timeout_s)
        return float(answers[-1])  # one score per image, then the corpus score
    except (JavaToolError, OSError, ValueError):
        meteor.close()
        _meteor.cache_clear()
        raise


def spice_score(gts, res, java: str, pkg: Path, timeout_s: float = JAVA_TIMEOUT_S) -> float:
    """Corpus SPICE as pycocoevalcap's ``Spice`` computes it (same jar and flags: the mean of each image's F-score),
    its files in a temporary directory that is always removed, the run under a deadline."""
    cwd = pkg / "spice"
    cache = cwd / "cache"
    try:
        cache.mkdir(exist_ok=True)
        cache_args = ["-cache", str(cache)] if os.access(cache, os.W_OK) else []
    except OSError:
        cache_args = []  # a read-only installation: no parse cache, same scores
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps([{"image_id": str(k), "test": res[k][0], "refs": gts[k]} for k in gts]))
        try:
            run = subprocess.run([java, "-jar", "-Xmx8G", SPICE_JAR, str(inp), *cache_args, "-out", str(out),
                                  "-subset", "-silent"], cwd=cwd, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise JavaToolError(f"no answer within {timeout_s:g} s") from None
        if run.returncode != 0:
            raise JavaToolError(f"exit status {run.returncode}{_last_line(run.stderr)}")
        results = json.loads(out.read_text())
    f_scores = []
    for item in results:
        try:
            f_scores.append(float(item["scores"]["All"]["f"]))
        except (TypeError, ValueError):
            f_scores.append(math.nan)  # pycocoevalcap's float_convert
    return sum(f_scores) / len(f_scores)


def _java_metric(name: str, score_fn, out: CocoScores, key: str) -> None:
    """A Java-backed scorer's score, or its failure as one reason line (never a traceback, never a hang)."""
    try:
        out.scores[key] = float(score_fn())
    except (JavaToolError, OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        out.unavailable[key] = f"{name} failed: {_one_line(e)}"
        out.failed.append(key)


def coco_caption_scores(hypotheses: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                        spice: bool = True, java_timeout_s: float = JAVA_TIMEOUT_S) -> CocoScores:
    """Score raw (untokenized) captions: ``hypotheses[id]`` one caption, ``references[id]`` one or more.

    Same ids in both. Raises CocoEvalUnavailable without pycocoevalcap, ValueError for mismatched ids.
    ``java_timeout_s`` bounds each exchange with a Java tool (see the module docstring).
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
    gts, res, tokenizer = _tokenize_all(dict(references), {k: [h] for k, h in hypotheses.items()}, java, pkg,
                                        java_timeout_s)
    out = CocoScores({}, {}, tokenizer, len(hypotheses))
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.scores.update({f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)})
    if java is None:
        out.unavailable["meteor"] = "needs Java (METEOR 1.5 is a jar): install a JRE, e.g. apt-get install " \
                                    "openjdk-17-jre-headless"
    else:
        _java_metric("METEOR", lambda: meteor_score(gts, res, java, pkg, java_timeout_s), out, "meteor")
    out.scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out.scores["cider"] = float(Cider().compute_score(gts, res)[0])
    _add_spice(out, gts, res, java, pkg, spice, java_timeout_s)
    return out


def _add_spice(out: CocoScores, gts, res, java: str | None, pkg: Path, enabled: bool, timeout_s: float) -> None:
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
    _java_metric("SPICE", lambda: spice_score(gts, res, java, pkg, timeout_s), out, "spice")
