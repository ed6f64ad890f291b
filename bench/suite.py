"""What the benchmarks share: one model, one export, the backends and the inputs, built once per shape config.

``get_suite(cfg, device, tmp_root)`` builds (and caches) a :class:`Suite`:

- the model: ``core.model.CaptionModel`` with random weights (no downloads) at the config's real shapes. Three
  adjustments make random weights behave like trained ones where it matters for a benchmark, without changing
  a shape or an operation (so speed is unaffected):
  * each residual branch's last BatchNorm scale is 0.1 (torchvision's ``zero_init_residual`` idea). A plain
    random ResNet-101 is chaotic: 1e-3 of input noise moved its features by 30% and bf16 autocast left them
    correlated at only 0.75 with fp32, so no reduced-precision path could ever agree with fp32. With small
    residual branches, bf16 features correlate at 0.999 while different images still give different features;
  * BatchNorm statistics calibrated on a few images (else activations of a random ResNet reach 1e5);
  * ``fc`` scaled so word distributions are peaked (the tutorial's init makes them almost flat, and ties between
    near-equal words would make caption comparisons between backends meaningless).
- one export directory (``export.to_onnx.export_model``: ONNX fp32 + int8 step, TorchScript) per config;
- the backends by name (``export.runtime``), each with ``encode``/``step``;
- the inputs: images for each batch size (seeded), and eager fp32 encoder outputs for the step and beam groups.

Backends (names used in the tests and the report):
    reference    the tutorial's per-image eager loop (bench/reference.py)
    eager        export.runtime.EagerBackend, fp32
    eager_bf16   eager with the encoder under torch.autocast(bfloat16); steps fp32 (encoder group only); like
                 ort_bf16enc, not run on a CPU without native bf16 (bench/plan.py)
    torchscript  export.runtime.TorchScriptBackend
    ort          export.runtime.OrtBackend, fp32 (CPU provider; CUDA provider with IO binding on GPU)
    ort_int8     OrtBackend with decoder_step.int8.onnx (dynamic int8); encoder fp32
    ort_bf16enc  the eager bf16 encoder + the ORT fp32 step (a faster encoder path for many images)
    ort_int8enc  the shipped encoder.int8.onnx (static QDQ, export --quantize int8) + the ORT fp32 step (CPU)
    ort_int8full the shipped int8 path, encoder.int8.onnx + decoder_step.int8.onnx (``--precision int8``, CPU)
    auto         ``load_backend("ort", ..., precision="auto")``: what the caption command runs by default (the
                 int8 path where the export validated it and this CPU runs it natively, else fp32)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

from bench.config import BenchConfig
from core import hardware
from core.decode import Encoded, Hypothesis, beam_search
from core.model import CaptionModel
from core.vocab import Vocabulary
from export.runtime import torch_threads

RESIDUAL_SCALE = 0.1  # scale of each residual branch's last BatchNorm in the random encoder
FP32_EXPORTED = ("torchscript", "ort")  # must give exactly eager fp32's captions
APPROXIMATE = ("ort_int8", "ort_bf16enc", "ort_int8enc", "ort_int8full", "auto")  # agreement rate reported


def cuda_available() -> bool:
    return hardware.detect().cuda


# ----------------------------------------------------------------------------------------------- the model
def make_vocab(vocab_size: int) -> Vocabulary:
    return Vocabulary([f"w{i}" for i in range(vocab_size - 4)])


def make_images(cfg: BenchConfig, n: int, seed: int) -> torch.Tensor:
    """n distinct image-like inputs (smooth random fields, per-image contrast), ImageNet-normalized range."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(cfg.model.image_size, cfg.model.image_size), mode="bilinear",
                                             align_corners=False)
    images = images * (0.5 + 1.5 * torch.rand(n, 1, 1, 1, generator=g))
    images = images + 0.3 * torch.randn(n, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
    return images.contiguous()


@torch.no_grad()
def calibrate_batchnorm(encoder: torch.nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics from one forward pass over ``images`` (cumulative average)."""
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    encoder.train()
    encoder(images)
    encoder.eval()
    for bn in bns:
        bn.momentum = 0.1


def build_model(cfg: BenchConfig) -> CaptionModel:
    torch.manual_seed(cfg.seed)
    model = CaptionModel(cfg.model).eval()
    with torch.no_grad():
        for block in model.encoder.modules():
            if isinstance(block, (Bottleneck, BasicBlock)):
                last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                last_bn.weight.mul_(RESIDUAL_SCALE)
    calibrate_batchnorm(model.encoder, make_images(cfg, 8, seed=cfg.seed + 100))
    with torch.no_grad():
        model.decoder.fc.weight.mul_(20.0)  # peaked word distributions, as a trained model has
    return model.eval()


@dataclass
class Suite:
    cfg: BenchConfig
    device: str
    model: CaptionModel
    vocab: Vocabulary
    export_dir: Path
    images: dict[int, torch.Tensor] = field(default_factory=dict)
    _backends: dict[str, Any] = field(default_factory=dict)
    _captions: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict)
    _encoded: dict[int, Encoded] = field(default_factory=dict)
    _features: dict[int, torch.Tensor] = field(default_factory=dict)
    _unavailable: dict[str, str] = field(default_factory=dict)
    reference_work: dict[str, dict] = field(default_factory=dict)  # kind -> {"images", "steps", "rows"} summed

    # -- inputs
    def image_batch(self, n: int) -> torch.Tensor:
        """The benchmark's images: batch n is the first n of one seeded set (same images for every backend)."""
        if not self.images:
            largest = max(self.cfg.images_large, self.cfg.images_small, *self.cfg.encoder_batches)
            self.images[largest] = make_images(self.cfg, largest, seed=self.cfg.seed + 1).to(self.device)
        (images,) = self.images.values()
        if n > images.shape[0]:
            raise ValueError(f"asked for {n} images; the suite holds {images.shape[0]}")
        return images[:n].contiguous()

    @torch.inference_mode()
    def encoded(self, n: int) -> Encoded:
        """Eager fp32 encoder outputs of the first n images (inputs of the step and beam-alone groups)."""
        if n not in self._encoded:
            self._encoded[n] = Encoded(*(t.contiguous() for t in self.model.encode(self.image_batch(n))))
        return self._encoded[n]

    @torch.inference_mode()
    def features(self, n: int) -> torch.Tensor:
        """The encoder's output (N,S,S,C) as the tutorial's beam search receives it."""
        if n not in self._features:
            self._features[n] = self.model.encoder(self.image_batch(n)).contiguous()
        return self._features[n]

    def step_inputs(self, n: int) -> tuple[torch.Tensor, ...]:
        """(words, h, c, enc_out, enc_att) for n images x k beams, mid-caption-like (seeded words, init state)."""
        k = self.cfg.beam_size
        enc = self.encoded(n)
        g = torch.Generator().manual_seed(self.cfg.seed + 7)
        words = torch.randint(4, self.cfg.model.vocab_size, (n * k,), generator=g).to(self.device)
        h = enc.h.repeat_interleave(k, dim=0).contiguous()
        c = enc.c.repeat_interleave(k, dim=0).contiguous()
        return words, h, c, enc.enc_out, enc.enc_att

    def tiled_features(self, n: int) -> list[torch.Tensor]:
        """Each image's features tiled per beam, (k,P,C), as the tutorial holds them mid-search."""
        enc_out = self.encoded(n).enc_out
        k = self.cfg.beam_size
        return [enc_out[i : i + 1].expand(k, -1, -1).contiguous() for i in range(n)]

    # -- backends
    def backend(self, name: str):
        if name in self._unavailable:
            import pytest

            pytest.skip(self._unavailable[name])
        if name not in self._backends:
            try:
                self._backends[name] = self._make_backend(name)
            except Exception as e:
                # Optional on a GPU machine: the fp16 graphs, and ORT's CUDA provider (its image may hold only
                # the CPU build of onnxruntime). Skipped with the reason; on CPU every backend must build.
                if name == "ort_fp16" or (self.device == "cuda" and name.startswith("ort")):
                    self._unavailable[name] = f"{name} on {self.device} unavailable: {type(e).__name__}: {e}"
                    import pytest

                    pytest.skip(self._unavailable[name])
                raise
        return self._backends[name]

    def _make_backend(self, name: str):
        from export.runtime import Bf16EncoderBackend, EagerBackend, OrtBackend, TorchScriptBackend

        threads = self.cfg.num_threads
        provider = ["cuda"] if self.device == "cuda" else ["cpu"]
        if name == "eager":
            return EagerBackend(self.model, self.vocab, device=self.device)
        if name == "eager_bf16":
            return Bf16EncoderBackend(self.backend("eager"), self.backend("eager"), name)
        if name == "torchscript":
            return TorchScriptBackend(self.export_dir, device=self.device)
        if name == "ort":
            return OrtBackend(self.export_dir, providers=provider, threads=threads)
        if name == "ort_int8":
            return OrtBackend(self.export_dir, providers=provider, threads=threads, int8=True)
        if name == "ort_fp16":
            return OrtBackend(self.export_dir, providers=provider, threads=threads, fp16=True)
        if name == "ort_bf16enc":
            return Bf16EncoderBackend(self.backend("eager"), self.backend("ort"), name)
        if name == "ort_int8enc":
            return OrtBackend(self.export_dir, providers=provider, threads=threads, int8_encoder=True)
        if name == "ort_int8full":
            return OrtBackend(self.export_dir, providers=provider, threads=threads, int8=True, int8_encoder=True)
        if name == "auto":
            from export.runtime import load_backend

            return load_backend("ort", self.export_dir, providers=provider, threads=threads, precision="auto")
        raise ValueError(f"unknown backend {name!r}")

    # -- the timed calls
    def caption_fn(self, backend: str, n: int) -> Callable[[], list[Hypothesis]]:
        """End to end: encode n images, then beam search with a fixed number of steps."""
        cfg, v, images = self.cfg, self.vocab, self.image_batch(n)
        if backend == "reference":
            from bench.reference import reference_search

            stats = self.reference_work.setdefault(f"caption:{n}", {})
            return self._synced(lambda: reference_search(self.model, images, True, cfg.beam_size, cfg.max_len,
                                                         v.start_id, v.end_id, stats))
        b = self.backend(backend)
        return self._searched(b, lambda: b.encode(images))

    def beam_fn(self, backend: str, n: int) -> Callable[[], list[Hypothesis]]:
        """Beam search alone, encoder outputs given (eager fp32's, the same for every backend)."""
        cfg, v = self.cfg, self.vocab
        if backend == "reference":
            from bench.reference import reference_search

            feats = self.features(n)
            stats = self.reference_work.setdefault(f"beam:{n}", {})
            return self._synced(lambda: reference_search(self.model, feats, False, cfg.beam_size, cfg.max_len,
                                                         v.start_id, v.end_id, stats))
        encoded = self.encoded(n)
        return self._searched(self.backend(backend), lambda: encoded)

    def _searched(self, b, encode: Callable[[], Encoded]) -> Callable[[], list[Hypothesis]]:
        """``encode()`` then beam search over ``b`` with a fixed number of steps, torch's threads as
        export.runtime.captioner.Captioner sets them for this backend."""
        cfg, v = self.cfg, self.vocab

        def run():
            with torch_threads(b.search_threads):
                return beam_search(encode(), b.step, cfg.beam_size, cfg.max_len, v.start_id, v.end_id,
                                   early_stop=False)

        return self._synced(run)

    def step_fn(self, backend: str, n: int) -> Callable[[], Any]:
        inputs = self.step_inputs(n)
        if backend == "reference":
            from bench.reference import reference_steps

            tiled = self.tiled_features(n)
            words, h, c = inputs[:3]

            def ref():
                with torch.inference_mode():
                    reference_steps(self.model, words, h, c, tiled)

            return self._synced(ref)
        b = self.backend(backend)
        return self._synced(lambda: b.step(*inputs))

    def encode_fn(self, backend: str, n: int) -> Callable[[], Any]:
        images = self.image_batch(n)
        if backend == "reference":  # the tutorial encodes one image at a time

            def ref():
                with torch.inference_mode():
                    return [self.model.encoder(images[i : i + 1]) for i in range(n)]

            return self._synced(ref)
        b = self.backend(backend)
        return self._synced(lambda: b.encode(images))

    def _synced(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        if self.device != "cuda":
            return fn

        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out

        return timed

    # -- correctness, outside the timed calls
    def captions(self, kind: str, backend: str, result: list[Hypothesis] | None = None) -> list[list[int]]:
        """Token lists of one (group kind, backend): from a timed call's result, else computed once here."""
        key = (kind, backend)
        if result is not None:
            self._captions[key] = [list(h.tokens) for h in result]
        if key not in self._captions:
            n = self.n_images(kind)
            fn = self.caption_fn(backend, n) if kind.startswith("caption") else self.beam_fn(backend, n)
            self._captions[key] = [list(h.tokens) for h in fn()]
        return self._captions[key]

    def agreement(self, kind: str, backend: str, against: str = "eager") -> float:
        """Fraction of images whose caption is identical to ``against``'s."""
        mine, theirs = self.captions(kind, backend), self.captions(kind, against)
        return sum(a == b for a, b in zip(mine, theirs)) / len(theirs)

    def token_agreement(self, kind: str, backend: str, against: str = "eager") -> float:
        """Fraction of word positions equal to ``against``'s (a softer measure than identical captions)."""
        same = total = 0
        for a, b in zip(self.captions(kind, backend), self.captions(kind, against)):
            same += sum(x == y for x, y in zip(a, b))
            total += max(len(a), len(b))
        return same / total if total else 1.0

    def reference_work_per_image(self, kind: str) -> dict[str, float] | None:
        """Average steps and beam-rows per image the reference ran (its beams shrink as they finish)."""
        key = f"{'caption' if kind.startswith('caption') else 'beam'}:{self.n_images(kind)}"
        st = self.reference_work.get(key)
        if not st or not st.get("images"):
            return None
        return {"steps": st["steps"] / st["images"], "rows": st["rows"] / st["images"]}

    def n_images(self, kind: str) -> int:
        return self.cfg.images_small if kind.endswith("small") else self.cfg.images_large


_SUITES: dict[tuple[str, str], Suite] = {}


def export_dir_for(cfg: BenchConfig, model: CaptionModel, vocab: Vocabulary, root: Path, device: str) -> Path:
    """Export once per shape config (and device: the fp16 graphs need CUDA) into root/export-<key>."""
    from export.to_onnx import export_model

    out = Path(root) / f"export-{cfg.model_key()}-{device}"
    if not (out / "manifest.json").is_file():
        # int8: calibrated on images seeded apart from the benchmark's inputs, checked on others (held out)
        kwargs: dict[str, Any] = {"quantize": "int8", "torchscript": True, "max_len": cfg.max_len,
                                  "beam_size": cfg.beam_size, "seed": cfg.seed,
                                  "quant_images": make_images(cfg, 8, seed=cfg.seed + 200),
                                  "calib_images": make_images(cfg, cfg.export_calib_images, seed=cfg.seed + 300)}
        if device == "cuda":
            kwargs["fp16"] = True
        try:
            export_model(model, vocab, out, **kwargs)
        except Exception:
            if "fp16" not in kwargs:
                raise
            kwargs.pop("fp16")  # fp16 graphs are optional: the ort_fp16 rows are skipped without them
            export_model(model, vocab, out, **kwargs)
    return out


def get_suite(cfg: BenchConfig, device: str = "cpu", tmp_root: Path | None = None) -> Suite:
    key = (cfg.model_key(), device)
    if key not in _SUITES:
        torch.set_num_threads(cfg.num_threads)
        if device == "cuda":  # eager fp32 means fp32: no TF32 tensor-core rounding in the baseline
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        model = build_model(cfg)
        vocab = make_vocab(cfg.model.vocab_size)
        root = Path(tmp_root) if tmp_root else Path(tempfile.mkdtemp(prefix="sat-bench-"))
        export_dir = export_dir_for(cfg, model, vocab, root, device)
        model = model.to(device)
        _SUITES[key] = Suite(cfg, device, model, vocab, export_dir)
    return _SUITES[key]
