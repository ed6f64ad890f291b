"""Run an exported captioning model: ONNX Runtime, TorchScript (legacy) or eager PyTorch behind one interface.

    from export.runtime import load_backend, Captioner
    backend = load_backend("ort", "exported/")              # or "torchscript", or "eager" with a .pt checkpoint
    captioner = Captioner(backend, beam_size=5)
    for r in captioner.caption_paths(["a.jpg", "b.jpg"], batch_size=16):
        print(r.path, r.caption if r.ok else r.error)

Every backend has ``encode(images [N,3,S,S]) -> core.decode.Encoded`` and ``step(words, h, c, enc_out, enc_att)``
on torch tensors, so ``core.decode.beam_search`` drives all of them the same way (N images x k beams = M rows a
step). An export directory is self-contained (see export/manifest.py): this module needs core.decode,
core.vocab and core.data's image decoding, never the training code or the checkpoint. Before any session is
created, the manifest's sha256 of each file is checked (tampered files are refused) and ONNX external-data
locations must stay inside the export directory.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from core.data import IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, load_image, to_rgb
from core.decode import Encoded, Hypothesis, beam_search, check_search
from core.vocab import Vocabulary, VocabFormatError
from export.manifest import (
    ENCODER_FP16_ONNX,
    ENCODER_ONNX,
    ENCODER_OUTPUTS,
    ENCODER_TS,
    SAFETENSORS,
    SAFETENSORS_META,
    STEP_FP16_ONNX,
    STEP_INPUTS,
    STEP_INT8_ONNX,
    STEP_ONNX,
    STEP_OUTPUTS,
    STEP_TS,
    VOCAB,
    ExportFormatError,
    check_external_data,
    read_manifest,
    read_verified,
)

log = logging.getLogger("export.runtime")

DEFAULT_MAX_LEN = 20
BACKENDS = ("ort", "torchscript", "eager")
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
_PROVIDER_ALIASES = {"cuda": CUDA_EP, "gpu": CUDA_EP, "cpu": CPU_EP}


# ------------------------------------------------------------------------------------------ preprocessing
def default_preprocess(image_size: int) -> dict[str, Any]:
    """The manifest's ``preprocess`` section: core.data's eval transform, written out as data."""
    return {
        "image_size": int(image_size),
        "resize": "stretch",  # whole image to (S, S), aspect ratio not kept, no crop
        "interpolation": "bilinear",  # Pillow Image.resize BILINEAR (antialiased when downscaling)
        "antialias": True,
        "color": "RGB",  # alpha composited onto white; grey/16-bit/CMYK converted (core.data.to_rgb)
        "exif_transpose": True,
        "divisor": 255.0,  # uint8 -> [0, 1] (x / 255) before normalization
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "layout": "NCHW",
        "dtype": "float32",
    }


class Preprocessor:
    """PIL image or file -> float32 tensor [3,S,S], following a manifest ``preprocess`` section."""

    def __init__(self, spec: dict[str, Any]):
        if spec.get("resize", "stretch") != "stretch" or spec.get("interpolation", "bilinear") != "bilinear":
            raise ExportFormatError(f"unsupported preprocessing {spec}: this runtime implements resize=stretch, bilinear")
        self.spec = spec
        self.image_size = int(spec["image_size"])
        self.divisor = float(spec.get("divisor", 255.0))
        self.exif_transpose = bool(spec.get("exif_transpose", True))
        self._mean = torch.tensor(spec["mean"], dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(spec["std"], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> Tensor:
        if img.mode != "RGB":
            img = to_rgb(img)
        s = self.image_size
        img = img.resize((s, s), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)
        return (x.to(torch.float32).div_(self.divisor) - self._mean) / self._std

    def load(self, path: str | os.PathLike) -> Tensor:
        """Decode and preprocess one file; an unreadable file raises core.data.ImageLoadError naming it."""
        if Path(path).is_dir():
            raise ImageLoadError(f"{path}: is a directory, not an image file")
        return self(load_image(path, exif_transpose=self.exif_transpose))


def check_images(images: Any, image_size: int) -> Tensor:
    """A float32 tensor [N,3,S,S] (N >= 1) or a ValueError naming the expected shape."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    expected = f"float32 images of shape [N, 3, {image_size}, {image_size}] (N >= 1, normalized as in the manifest)"
    if not isinstance(images, Tensor):
        raise ValueError(f"expected {expected}, got a {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] < 1 or tuple(images.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"expected {expected}, got shape {list(images.shape)}")
    if images.dtype != torch.float32:
        raise ValueError(f"expected {expected}, got dtype {images.dtype}")
    return images


# ----------------------------------------------------------------------------------------------- backends
class Backend:
    """The interface every backend implements (and the attributes the Captioner reads)."""

    name = "backend"
    device = torch.device("cpu")
    vocab: Vocabulary | None = None
    manifest: dict[str, Any] | None = None
    preprocess: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.preprocess["image_size"])

    @property
    def decode_defaults(self) -> dict[str, Any]:
        """Decoding settings recorded with the model (the manifest's ``decode`` section), e.g. max_len."""
        return (self.manifest or {}).get("decode", {})

    def check_images(self, images: Any) -> Tensor:
        return check_images(images, self.image_size)

    def encode(self, images: Tensor) -> Encoded:
        raise NotImplementedError

    def step(self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


def _load_vocab(export_dir: Path, manifest: dict, verify: bool) -> Vocabulary:
    import json

    data = read_verified(export_dir, manifest, VOCAB, verify)
    try:
        vocab = Vocabulary.from_dict(json.loads(data.decode("utf-8")), source=str(export_dir / VOCAB))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and VocabFormatError are ValueErrors
        raise ExportFormatError(f"{export_dir / VOCAB}: not a valid vocabulary: {e}") from e
    if len(vocab) != manifest["dims"]["vocab_size"]:
        raise ExportFormatError(
            f"{export_dir / VOCAB} has {len(vocab)} words but the manifest says vocab_size={manifest['dims']['vocab_size']}"
        )
    return vocab


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (safe under pytest's capture)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def configure_logging(prefix: str, level: int) -> None:
    """Log the "export" hierarchy (exporter and runtime) to stderr once; the root logger is left alone."""
    logger = logging.getLogger("export")
    for h in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(h)
    logger.addHandler(StderrHandler(prefix))
    logger.setLevel(level)
    logger.propagate = False


def cuda_visible() -> bool:
    """A CUDA device that torch (the same CUDA build as onnxruntime-gpu) can use."""
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install should read as "no GPU", not crash the CPU path
        return False


def resolve_providers(providers: Sequence[str] | str | None) -> tuple[list[str], bool]:
    """(ORT provider names in priority order, whether CUDA was explicitly required)."""
    import onnxruntime as ort

    available = ort.get_available_providers()  # lists CUDA for the GPU build even without a GPU
    gpu = CUDA_EP in available and cuda_visible()
    if providers is None or providers == "auto":
        return ([CUDA_EP, CPU_EP] if gpu else [CPU_EP]), False
    if isinstance(providers, str):
        providers = [providers]
    names = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    for name in names:
        if name not in available:
            raise RuntimeError(f"ONNX Runtime provider {name} requested but this onnxruntime build has only {available}")
    if CUDA_EP in names and not gpu:
        raise RuntimeError(
            f"{CUDA_EP} requested but no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "use providers=['cpu'] / --device cpu"
        )
    return names, CUDA_EP in names


class OrtBackend(Backend):
    """ONNX Runtime sessions for encoder.onnx and decoder_step.onnx (or its int8 / fp16 variant).

    providers: None (CUDA then CPU when a GPU is visible, else CPU), or explicit names/aliases ("cuda", "cpu");
    an explicitly requested CUDA provider that cannot run is an error, never a silent CPU fallback.
    On CUDA, inputs and outputs are bound to torch CUDA tensors (IO binding): the step's state stays on the
    device between steps. On CPU, numpy views of the torch tensors are fed (no copies).
    """

    name = "ort"

    def __init__(
        self,
        export_dir: str | os.PathLike,
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        int8: bool = False,
        fp16: bool = False,
        verify: bool = True,
        device_id: int = 0,
    ):
        import onnxruntime as ort

        self._ort = ort
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.preprocess = self.manifest["preprocess"]
        self.vocab = _load_vocab(self.export_dir, self.manifest, verify)
        if int8 and fp16:
            raise ValueError("choose int8 or fp16, not both")
        encoder_file = ENCODER_FP16_ONNX if fp16 else ENCODER_ONNX
        step_file = STEP_INT8_ONNX if int8 else STEP_FP16_ONNX if fp16 else STEP_ONNX
        for f, flag in ((step_file, "--quantize int8" if int8 else "--fp16"), (encoder_file, "--fp16")):
            if f not in self.manifest["files"] and (int8 or fp16):
                raise ExportFormatError(f"{self.export_dir} has no {f}: export with {flag} to use it")
        names, required_cuda = resolve_providers(providers)
        if fp16 and CUDA_EP not in names:
            raise RuntimeError("the fp16 graphs need the CUDA provider (no GPU visible or providers=['cpu'])")
        if CUDA_EP in names and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN libraries from the nvidia-* wheels that torch brought along
                ort.preload_dlls()
            except Exception as e:  # pragma: no cover - depends on the machine
                log.warning("onnxruntime.preload_dlls() failed: %s", e)
        # fp32 graphs compute in fp32 on the GPU too (no TF32 matmuls/convs): captions match the CPU's; the fp16
        # graphs are the fast option.
        cuda_opts = {"device_id": device_id, "use_tf32": 0}
        provider_list: list[Any] = [(CUDA_EP, cuda_opts) if n == CUDA_EP else n for n in names]

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3  # errors only: a CUDA fallback is reported below, loudly
        self.threads = threads
        self.encoder_sess = self._session(encoder_file, so, provider_list, verify)
        self.step_sess = self._session(step_file, so, provider_list, verify)
        self.files = (encoder_file, step_file)
        got = self.step_sess.get_providers()
        if CUDA_EP in names and CUDA_EP not in got:
            msg = f"{CUDA_EP} could not be created (libraries or driver missing?); sessions run on {got}"
            if required_cuda or fp16:
                raise RuntimeError(msg)
            log.warning(msg)
        self.providers = got
        self.on_cuda = CUDA_EP in got
        self.device = torch.device("cuda", device_id) if self.on_cuda else torch.device("cpu")
        dims = self.manifest["dims"]
        self._v, self._d, self._p = dims["vocab_size"], dims["decoder_dim"], dims["num_pixels"]
        self._c, self._a = dims["encoder_dim"], dims["attention_dim"]
        log.info("%s", self.describe())

    def _session(self, name: str, so, providers, verify: bool):
        data = read_verified(self.export_dir, self.manifest, name, verify)
        external = check_external_data(data, self.export_dir, name, self.manifest, verify)
        try:
            if external:  # external data resolves relative to the model's path
                return self._ort.InferenceSession(str(self.export_dir / name), so, providers=providers)
            return self._ort.InferenceSession(data, so, providers=providers)  # the bytes that were verified
        except Exception as e:
            raise ExportFormatError(f"{self.export_dir / name}: ONNX Runtime cannot load it (corrupt?): {e}") from e

    def describe(self) -> str:
        variant = {STEP_INT8_ONNX: " int8 step", STEP_FP16_ONNX: " fp16"}.get(self.files[1], "")
        threads = f", {self.threads} intra-op threads" if self.threads else ""
        io = ", IO binding" if self.on_cuda else ""
        return f"ort{variant} on {self.providers[0]}{threads}{io} ({self.export_dir})"

    # -- CPU: numpy views in, numpy out wrapped without copies
    def _run_cpu(self, sess, names_in, tensors, names_out) -> list[Tensor]:
        feeds = {n: t.detach().cpu().contiguous().numpy() for n, t in zip(names_in, tensors)}
        return [torch.from_numpy(o) for o in sess.run(list(names_out), feeds)]

    # -- CUDA: bind torch device memory to the session's inputs and outputs
    def _run_cuda(self, sess, names_in, tensors, names_out, out_shapes) -> list[Tensor]:
        dev = self.device
        ins = [t.detach().to(dev).contiguous() for t in tensors]
        outs = [torch.empty(s, dtype=torch.float32, device=dev) for s in out_shapes]
        binding = sess.io_binding()
        for n, t in zip(names_in, ins):
            dtype = np.int64 if t.dtype == torch.int64 else np.float32
            binding.bind_input(n, "cuda", dev.index or 0, dtype, tuple(t.shape), t.data_ptr())
        for n, t in zip(names_out, outs):
            binding.bind_output(n, "cuda", dev.index or 0, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(dev).synchronize()  # inputs written by torch's stream are complete
        sess.run_with_iobinding(binding)  # returns after ORT's stream is done with the outputs
        return outs

    def encode(self, images: Tensor) -> Encoded:
        images = self.check_images(images)
        n = images.shape[0]
        if self.on_cuda:
            shapes = [(n, self._p, self._c), (n, self._p, self._a), (n, self._d), (n, self._d)]
            return Encoded(*self._run_cuda(self.encoder_sess, ("images",), (images,), ENCODER_OUTPUTS, shapes))
        return Encoded(*self._run_cpu(self.encoder_sess, ("images",), (images,), ENCODER_OUTPUTS))

    def step(self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        inputs = (words.long(), h, c, enc_out, enc_att)
        if self.on_cuda:
            m = words.shape[0]
            shapes = [(m, self._v), (m, self._d), (m, self._d), (m, self._p)]
            return tuple(self._run_cuda(self.step_sess, STEP_INPUTS, inputs, STEP_OUTPUTS, shapes))
        return tuple(self._run_cpu(self.step_sess, STEP_INPUTS, inputs, STEP_OUTPUTS))


class TorchScriptBackend(Backend):
    """encoder.ts + decoder_step.ts (legacy: TorchScript is deprecated upstream in favour of torch.export)."""

    name = "torchscript"

    def __init__(self, export_dir: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True,
                 threads: int | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.preprocess = self.manifest["preprocess"]
        self.vocab = _load_vocab(self.export_dir, self.manifest, verify)
        self.device = torch.device(device) if device else torch.device("cuda" if cuda_visible() else "cpu")
        if threads:
            torch.set_num_threads(int(threads))
        self.encoder = self._load(ENCODER_TS, verify)
        self.step_module = self._load(STEP_TS, verify)

    def _load(self, name: str, verify: bool):
        if name not in self.manifest["files"]:
            raise ExportFormatError(f"{self.export_dir} has no {name} (exported with --no-torchscript?)")
        data = read_verified(self.export_dir, self.manifest, name, verify)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # "torch.jit.load is deprecated": known, legacy
                return torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
        except Exception as e:
            raise ExportFormatError(f"{self.export_dir / name}: not a loadable TorchScript file (corrupt?): {e}") from e

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Encoded:
        images = self.check_images(images).to(self.device)
        return Encoded(*self.encoder(images))

    @torch.inference_mode()
    def step(self, words, h, c, enc_out, enc_att):
        return self.step_module(words.long(), h, c, enc_out, enc_att)


class EagerBackend(Backend):
    """The PyTorch model itself (the reference every other backend is compared against)."""

    name = "eager"

    def __init__(self, model, vocab: Vocabulary | None = None, device: str | torch.device | None = None,
                 preprocess: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None,
                 decode: dict[str, Any] | None = None):
        self.device = torch.device(device) if device else torch.device("cuda" if cuda_visible() else "cpu")
        self.model = model.eval().to(self.device)
        self.vocab = vocab
        self.manifest = manifest
        self.preprocess = preprocess or default_preprocess(model.cfg.image_size)
        self._decode = decode

    @property
    def decode_defaults(self) -> dict[str, Any]:
        return self._decode if self._decode is not None else super().decode_defaults

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "EagerBackend":
        from core.checkpoint import load_checkpoint, model_from_checkpoint  # the checkpoint reader, not training code

        state = load_checkpoint(path)
        model, vocab = model_from_checkpoint(state, path)
        return cls(model, vocab, device, decode=state.get("decode"))  # e.g. an imported tutorial model's max_len

    @classmethod
    def from_export_dir(cls, export_dir: str | os.PathLike, device: str | torch.device | None = None,
                        verify: bool = True) -> "EagerBackend":
        """model.safetensors + model.json of an export directory (hash-checked like every other file)."""
        from core.checkpoint import load_safetensors

        export_dir = Path(export_dir)
        manifest = read_manifest(export_dir)
        if SAFETENSORS not in manifest["files"]:
            raise ExportFormatError(
                f"{export_dir} holds no {SAFETENSORS} (exported with --no-safetensors): "
                "pass the checkpoint .pt to the eager backend instead"
            )
        for name in (SAFETENSORS, SAFETENSORS_META):
            read_verified(export_dir, manifest, name, verify)
        model, vocab = load_safetensors(export_dir)
        return cls(model, vocab, device, preprocess=manifest["preprocess"], manifest=manifest)

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Encoded:
        images = self.check_images(images).to(self.device)
        return self.model.encode(images)

    @torch.inference_mode()
    def step(self, words, h, c, enc_out, enc_att):
        return self.model.step(words.long(), h, c, enc_out, enc_att)


def load_backend(name: str, path: str | os.PathLike, *, providers=None, threads: int | None = None,
                 int8: bool = False, fp16: bool = False, device: str | None = None, verify: bool = True) -> Backend:
    """``name`` in ort|torchscript|eager. ``path``: an export directory; for eager also a checkpoint .pt.

    eager + directory: the export's model.safetensors (written by export/to_onnx.py unless --no-safetensors),
    or a directory holding only model.safetensors + model.json (core.checkpoint.save_safetensors).
    """
    path = Path(path)
    if name == "ort":
        if device and providers is None:
            providers = [device]
        return OrtBackend(path, providers=providers, threads=threads, int8=int8, fp16=fp16, verify=verify)
    if int8 or fp16:
        raise ValueError(f"int8/fp16 graphs are ONNX only; backend {name!r} runs fp32")
    if name == "torchscript":
        return TorchScriptBackend(path, device=device, verify=verify, threads=threads)
    if name == "eager":
        if threads:
            torch.set_num_threads(int(threads))
        if path.is_file():
            return EagerBackend.from_checkpoint(path, device)
        if (path / "manifest.json").is_file():
            return EagerBackend.from_export_dir(path, device, verify)
        if (path / SAFETENSORS).is_file():
            from core.checkpoint import load_safetensors

            model, vocab = load_safetensors(path)
            return EagerBackend(model, vocab, device)
        raise ExportFormatError(f"{path}: expected a checkpoint .pt file or an export directory for the eager backend")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------- captioner
@dataclass
class CaptionResult:
    path: str
    caption: str = ""
    words: list[str] = field(default_factory=list)
    score: float = float("nan")
    alphas: Tensor | None = None  # [len(words), P], when keep_alphas
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"file": self.path, "error": self.error}
        return {"file": self.path, "caption": self.caption, "score": round(self.score, 6)}


class Captioner:
    """Beam search (core.decode) over a backend, batched: N images x k beams are the M rows of one step."""

    def __init__(self, backend: Backend, vocab: Vocabulary | None = None, beam_size: int = 5,
                 max_len: int | None = None, length_norm: float = 0.0, preprocess: dict[str, Any] | None = None,
                 search: str = "default"):
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
        self.preprocessor = Preprocessor(preprocess or backend.preprocess)

    def caption_tensors(self, images: Tensor) -> list[Hypothesis]:
        """Preprocessed images [N,3,S,S] float32 -> one Hypothesis per image."""
        images = self.backend.check_images(images)
        encoded = self.backend.encode(images)
        return beam_search(encoded, self.backend.step, self.beam_size, self.max_len, self.vocab.start_id,
                           self.vocab.end_id, length_norm=self.length_norm, search=self.search)

    def caption(self, images: Tensor) -> list[str]:
        return [self.vocab.decode(h.tokens) for h in self.caption_tensors(images)]

    def _load_batch(self, paths: Sequence[str]) -> list[Tensor | str]:
        out: list[Tensor | str] = []
        for p in paths:
            try:
                out.append(self.preprocessor.load(p))
            except ImageLoadError as e:
                out.append(str(e))
            except OSError as e:
                out.append(f"{p}: {e.strerror or e}")
        return out

    def caption_paths(self, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                      keep_alphas: bool = False) -> Iterator[CaptionResult]:
        """Caption image files in order, batch_size at a time (memory flat in the number of files).

        Decoding of the next batch overlaps inference on the current one (one background thread). A file that
        is not a readable image yields a CaptionResult with ``error`` set (naming the file); the rest go on.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        def chunks() -> Iterator[list[str]]:
            chunk: list[str] = []
            for p in paths:
                chunk.append(str(p))
                if len(chunk) == batch_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-load") as pool:
            it = chunks()
            first = next(it, None)
            pending = (first, pool.submit(self._load_batch, first)) if first else None
            while pending is not None:
                chunk, future = pending
                nxt = next(it, None)
                pending = (nxt, pool.submit(self._load_batch, nxt)) if nxt else None
                loaded = future.result()
                good = [i for i, x in enumerate(loaded) if isinstance(x, Tensor)]
                hyps: dict[int, Hypothesis] = {}
                if good:
                    batch = torch.stack([loaded[i] for i in good])
                    hyps = dict(zip(good, self.caption_tensors(batch)))
                for i, p in enumerate(chunk):
                    if i not in hyps:
                        yield CaptionResult(p, error=loaded[i])
                        continue
                    hyp = hyps[i]
                    words = self.vocab.decode_tokens(hyp.tokens)
                    yield CaptionResult(p, " ".join(words), words, hyp.score, hyp.alphas if keep_alphas else None)


__all__ = [
    "Backend",
    "OrtBackend",
    "TorchScriptBackend",
    "EagerBackend",
    "load_backend",
    "Captioner",
    "CaptionResult",
    "Preprocessor",
    "default_preprocess",
    "check_images",
    "resolve_providers",
    "ExportFormatError",
    "VocabFormatError",
]
