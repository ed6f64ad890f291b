"""Captioner: images or image files -> captions, by core.decode's beam search over any backend.

    from export.runtime import load_backend, Captioner
    captioner = Captioner(load_backend("ort", "exported/"), beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

Files are read by core.images (the one image loader) and transformed as the manifest's ``preprocess`` section
says, which is core.images' eval transform.

Decoding controls (sampling, diverse beam search, trigram blocking, bad endings: core.decode.DecodeControls) are
the Captioner's ``controls``, or per call (``decode_tensors(images, controls)``); with several captions per image
(``sample_n``, ``beam_groups``) a CaptionResult's ``alternatives`` holds the others:

    controls = decode_controls(captioner.vocab, sample_method="top-p", top_p=0.9, sample_n=3, seed=0)
    Captioner(backend, controls=controls)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from core.decode import BAD_ENDINGS, DecodeControls, Hypothesis, bad_ending_ids, check_search, decode
from core.hardware import cpu_cores
from core.images import ImageLoadError, PixelBudget, decode_rgb, open_image, reduce_jpeg_scale
from core.vocab import Vocabulary
from export.runtime.backends import Backend, torch_threads
from export.manifest import DEFAULT_MAX_LEN, transform_for


@dataclass
class CaptionResult:
    path: str
    caption: str = ""
    words: list[str] = field(default_factory=list)
    score: float = float("nan")
    alphas: Tensor | None = None  # [len(words), P], when keep_alphas
    error: str | None = None
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # (caption, score) of the others, if asked

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.path, "error": self.error}
        out = {"file": self.path, "caption": self.caption, "score": round(self.score, 6)}
        if self.alternatives:
            out["captions"] = [{"caption": c, "score": round(s, 6)} for c, s in [(self.caption, self.score),
                                                                               *self.alternatives]]
        return out

    @property
    def captions(self) -> list[str]:
        """Every caption of the image: the first, then the alternatives."""
        return [self.caption, *(c for c, _ in self.alternatives)]


def decode_controls(vocab: Vocabulary, bad_endings: bool | Sequence[str] = False, **fields: Any) -> DecodeControls:
    """core.decode.DecodeControls with the bad endings as words: True (core.decode.BAD_ENDINGS), a list, or off."""
    words = BAD_ENDINGS if bad_endings is True else (bad_endings or ())
    ids = bad_ending_ids(words, vocab.stoi.get) if words else ()
    return DecodeControls(bad_ending_ids=ids, **fields)


def _chunks(paths: Iterable[str | os.PathLike], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for p in paths:
        chunk.append(str(p))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Captioner:
    """Beam search (core.decode) over a backend, batched: N images x k beams are the M rows of one step."""

    def __init__(self, backend: Backend, vocab: Vocabulary | None = None, beam_size: int = 5,
                 max_len: int | None = None, length_norm: float = 0.0, preprocess: dict[str, Any] | None = None,
                 search: str = "default", controls: DecodeControls | None = None):
        self.backend = backend
        self.vocab = vocab or backend.vocab
        if self.vocab is None:
            raise ValueError("no vocabulary: pass vocab= (the backend did not bring one)")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        check_search(search, length_norm)
        self.beam_size = beam_size
        self.max_len = int(max_len or backend.decode_defaults.get("max_len", DEFAULT_MAX_LEN))
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        self.length_norm = length_norm
        self.search = search  # "default", or "tutorial": the tutorial's caption_image_beam_search decisions
        self.controls = controls or DecodeControls()  # sampling, diverse beams, trigram blocking, bad endings
        self._check(self.controls)
        self.transform = transform_for(preprocess or backend.preprocess)
        self.image_size = int((preprocess or backend.preprocess)["image_size"])
        self.budget = PixelBudget()  # caption_paths' loader threads: one image of the pixel limit at a time

    def _check(self, controls: DecodeControls) -> None:
        if controls.beam_groups > 1 and self.beam_size % controls.beam_groups:
            raise ValueError(f"beam_size ({self.beam_size}) must be a multiple of beam_groups ({controls.beam_groups})")
        if self.search == "tutorial" and (controls.sampling or controls.beam_groups > 1):
            raise ValueError("the tutorial search is a beam search: it cannot sample or use beam groups")

    def caption_tensors(self, images: Tensor) -> list[Hypothesis]:
        """Preprocessed images [N,3,S,S] float32 -> one Hypothesis per image (the first of decode_tensors')."""
        return [hyps[0] for hyps in self.decode_tensors(images)]

    def decode_tensors(self, images: Tensor, controls: DecodeControls | None = None) -> list[list[Hypothesis]]:
        """Preprocessed images [N,3,S,S] float32 -> the captions of each image under ``controls`` (default: the
        Captioner's): one, or sample_n / beam_groups of them."""
        controls = controls or self.controls
        if controls is not self.controls:
            self._check(controls)
        images = self.backend.check_images(images)
        with torch_threads(self.backend.search_threads):
            encoded = self.backend.encode(images)
            return decode(encoded, self.backend.step, self.beam_size, self.max_len, self.vocab.start_id,
                          self.vocab.end_id, length_norm=self.length_norm, search=self.search, controls=controls)

    def caption(self, images: Tensor) -> list[str]:
        return [self.vocab.decode(h.tokens) for h in self.caption_tensors(images)]

    def load(self, path: str | os.PathLike) -> Tensor:
        """One file as the model's input [3,S,S]; an unusable file raises core.images.ImageLoadError naming it."""
        with open_image(path) as im:
            reduce_jpeg_scale(im, self.image_size)  # a large JPEG decodes at 1/2..1/8 scale, >= 2x the input
            with self.budget.take(im.size[0] * im.size[1]):  # decoded and resized under the loaders' budget
                return self.transform(decode_rgb(im, path, grey_ok=True))  # grey stays 1 byte/pixel until resized

    def _load_one(self, path: str) -> Tensor | str:
        """The model's input for one file, or the error that names it."""
        try:
            return self.load(path)
        except ImageLoadError as e:
            return str(e)
        except OSError as e:
            return f"{path}: {e.strerror or e}"

    def _results(self, chunk: list[str], loaded: list[Tensor | str], keep_alphas: bool) -> Iterator[CaptionResult]:
        good = [i for i, x in enumerate(loaded) if isinstance(x, Tensor)]
        hyps: dict[int, list[Hypothesis]] = {}
        if good:
            hyps = dict(zip(good, self.decode_tensors(torch.stack([loaded[i] for i in good]))))
        for i, p in enumerate(chunk):
            if i not in hyps:
                yield CaptionResult(p, error=loaded[i])
                continue
            hyp, *others = hyps[i]
            words = self.vocab.decode_tokens(hyp.tokens)
            alphas = self.word_alphas(hyp, words) if keep_alphas else None
            alternatives = [(self.vocab.decode(h.tokens), h.score) for h in others]
            yield CaptionResult(p, " ".join(words), words, hyp.score, alphas, alternatives=alternatives)

    def word_alphas(self, hyp: Hypothesis, words: list[str]) -> Tensor:
        """The attention rows [len(words), P] of ``words`` = ``vocab.decode_tokens(hyp.tokens)``."""
        # decode_tokens skips any <pad>/<start> a model emits: keep the attention rows of the words it kept
        rows = [k for k, t in enumerate(hyp.tokens) if int(t) not in (self.vocab.pad_id, self.vocab.start_id)]
        return hyp.alphas[rows[:len(words)]]

    def caption_paths(self, paths: Iterable[str | os.PathLike], batch_size: int = 16, keep_alphas: bool = False,
                      workers: int | None = None, prefetch: int = 2) -> Iterator[CaptionResult]:
        """Caption image files in order, batch_size at a time (memory flat in the number of files).

        Files are decoded and resized by a pool of ``workers`` threads (default: this process's cores, at most 8;
        PIL and torch release the GIL while they work), up to ``prefetch`` batches ahead of the one being
        encoded and searched, so a folder of JPEGs runs at the compute rate. A file that is not a readable image
        yields a CaptionResult with ``error`` set (naming the file); the rest go on.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        workers = workers or min(8, cpu_cores())
        chunks = _chunks(paths, batch_size)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="caption-load") as pool:
            pending: deque[tuple[list[str], list[Future]]] = deque()

            def submit() -> None:
                chunk = next(chunks, None)
                if chunk:
                    pending.append((chunk, [pool.submit(self._load_one, p) for p in chunk]))

            for _ in range(prefetch + 1):  # the batch to caption now, and prefetch more behind it
                submit()
            while pending:
                chunk, futures = pending.popleft()
                yield from self._results(chunk, [f.result() for f in futures], keep_alphas)
                submit()  # after this batch: at most prefetch batches load while one is captioned
