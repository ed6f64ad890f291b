"""The backends that run an exported model: ONNX Runtime, TorchScript (when exported) and eager PyTorch.

    from export.runtime import load_backend        # picks one of these by name and path
    backend = load_backend("ort", "exported/")      # or "torchscript", or "eager" with a .pt checkpoint
    enc = backend.encode(images)                     # images float32 [N,3,S,S] -> core.decode.Encoded
    logprobs, h, c, alpha = backend.step(words, h, c, enc.enc_out, enc.enc_att)   # M = N x k rows

Every backend takes and returns torch tensors, so ``core.decode.beam_search`` drives all of them the same way.
Before any session is created, the manifest's sha256 of each file is checked (a file changed after the export is
refused; a manifest rewritten along with it is not, unless pinned: see export/manifest.py) and
ONNX external-data locations must stay inside the export directory. Where CUDA is used by default is decided
by ``core.hardware``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core import hardware
from core.decode import Encoded
from core.vocab import Vocabulary
from export.manifest import (
    ENCODER_FP16_ONNX,
    ENCODER_INT8_ONNX,
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
    default_preprocess,
    read_manifest,
    read_verified,
)

log = logging.getLogger("sat.export.runtime")

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
_PROVIDER_ALIASES = {"cuda": CUDA_EP, "gpu": CUDA_EP, "cpu": CPU_EP}


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


def default_device() -> torch.device:
    return torch.device("cuda" if hardware.detect().cuda else "cpu")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside the block (None: left as they are), restored after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Backend:
    """The interface every backend implements (and the attributes the Captioner reads)."""

    name = "backend"
    device = torch.device("cpu")
    vocab: Vocabulary | None = None
    manifest: dict[str, Any] | None = None
    preprocess: dict[str, Any]
    # torch's threads while the beam search drives this backend (torch_threads); None: torch's own setting
    search_threads: int | None = None

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


def resolve_providers(providers: Sequence[str] | str | None) -> tuple[list[str], bool]:
    """(ORT provider names in priority order, whether CUDA was explicitly required)."""
    import onnxruntime as ort

    available = ort.get_available_providers()  # lists CUDA for the GPU build even without a GPU
    if providers is None or providers == "auto":
        on_cuda = hardware.choose_caption_path(hardware.detect(ort=True)).value[1] == "cuda"
        return ([CUDA_EP, CPU_EP] if on_cuda else [CPU_EP]), False
    if isinstance(providers, str):
        providers = [providers]
    names = [_PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    for name in names:
        if name not in available:
            raise RuntimeError(f"ONNX Runtime provider {name} requested but this onnxruntime build has only "
                               f"{', '.join(available)}")
    if CUDA_EP in names and not (CUDA_EP in available and hardware.detect().cuda):
        raise RuntimeError(f"{CUDA_EP} requested but no CUDA GPU is visible; use providers=['cpu'] / --device cpu")
    return names, CUDA_EP in names


def _session_options(ort, threads: int | None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    # Idle pool threads sleep instead of spinning: the encoder and the step are two sessions used in turns, and a
    # spinning pool takes a core from the one that works (docs/benchmarks.md has the figures).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: a CUDA fallback is reported by the backend, loudly
    return so


class OrtBackend(Backend):
    """ONNX Runtime sessions for encoder.onnx and decoder_step.onnx (or their int8 / fp16 variants).

    int8: the int8 decoder step; int8_encoder: the int8 encoder (both: ``--precision int8``).

    providers: None (CUDA then CPU where core.hardware says ORT's CUDA provider works, else CPU), or explicit
    names/aliases ("cuda", "cpu"); an explicitly requested CUDA provider that cannot run is an error, never a
    silent CPU fallback. On CUDA, inputs and outputs are bound to torch CUDA tensors (IO binding): the step's
    state stays on the device between steps. On CPU, numpy views of the torch tensors are fed (no copies).
    """

    name = "ort"

    def __init__(self, export_dir: str | os.PathLike, providers: Sequence[str] | str | None = None,
                 threads: int | None = None, int8: bool = False, fp16: bool = False, verify: bool = True,
                 device_id: int = 0, int8_encoder: bool = False):
        import onnxruntime as ort

        self._ort = ort
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.preprocess = self.manifest["preprocess"]
        self.vocab = _load_vocab(self.export_dir, self.manifest, verify)
        self.files = self._graph_files(int8, fp16, int8_encoder)
        names, required_cuda = resolve_providers(providers)
        if fp16 and CUDA_EP not in names:
            raise RuntimeError("the fp16 graphs need the CUDA provider (no GPU visible or providers=['cpu'])")
        so = _session_options(ort, threads)
        self.threads = threads
        provider_list = self._provider_list(names, device_id)
        self.encoder_sess = self._session(self.files[0], so, provider_list, verify)
        self.step_sess = self._session(self.files[1], so, provider_list, verify)
        got = self.step_sess.get_providers()
        if CUDA_EP in names and CUDA_EP not in got:
            msg = f"{CUDA_EP} could not be created (libraries or driver missing?); sessions run on {got}"
            if required_cuda or fp16:
                raise RuntimeError(msg)
            log.warning(msg)
        self.providers = got
        self.on_cuda = CUDA_EP in got
        self.device = torch.device("cuda", device_id) if self.on_cuda else torch.device("cpu")
        # On CPU the model runs in ORT's pool and torch only does the search's small ops between runs: one torch
        # thread, so that torch's spinning OpenMP workers leave the cores to ORT.
        self.search_threads = None if self.on_cuda else 1
        dims = self.manifest["dims"]
        self._v, self._d, self._p = dims["vocab_size"], dims["decoder_dim"], dims["num_pixels"]
        self._c, self._a = dims["encoder_dim"], dims["attention_dim"]
        log.debug("%s", self.describe())

    def _graph_files(self, int8: bool, fp16: bool, int8_encoder: bool = False) -> tuple[str, str]:
        if (int8 or int8_encoder) and fp16:
            raise ValueError("choose int8 or fp16, not both")
        encoder_file = ENCODER_FP16_ONNX if fp16 else ENCODER_INT8_ONNX if int8_encoder else ENCODER_ONNX
        step_file = STEP_INT8_ONNX if int8 else STEP_FP16_ONNX if fp16 else STEP_ONNX
        for f, flag in ((step_file, "--quantize int8" if int8 else "--fp16"),
                        (encoder_file, "--quantize int8" if int8_encoder else "--fp16")):
            if f not in self.manifest["files"] and (int8 or fp16 or int8_encoder):
                raise ExportFormatError(f"{self.export_dir} has no {f}: export with {flag} to use it")
        return encoder_file, step_file

    def _provider_list(self, names: list[str], device_id: int) -> list[Any]:
        if CUDA_EP in names and hasattr(self._ort, "preload_dlls"):
            try:  # CUDA/cuDNN libraries from the nvidia-* wheels that torch brought along
                self._ort.preload_dlls()
            except Exception as e:  # pragma: no cover - depends on the machine
                log.warning("onnxruntime.preload_dlls() failed: %s", e)
        # fp32 graphs compute in fp32 on the GPU too (no TF32 matmuls/convs): captions match the CPU's; the fp16
        # graphs are the fast option.
        cuda_opts = {"device_id": device_id, "use_tf32": 0}
        return [(CUDA_EP, cuda_opts) if n == CUDA_EP else n for n in names]

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
        variant = " int8 encoder +" + variant if self.files[0] == ENCODER_INT8_ONNX else variant
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
    """encoder.ts + decoder_step.ts, written by ``export/to_onnx.py --torchscript`` (deprecated upstream)."""

    name = "torchscript"

    def __init__(self, export_dir: str | os.PathLike, device: str | torch.device | None = None, verify: bool = True,
                 threads: int | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.preprocess = self.manifest["preprocess"]
        self.vocab = _load_vocab(self.export_dir, self.manifest, verify)
        self.device = torch.device(device) if device else default_device()
        if threads:
            torch.set_num_threads(int(threads))
        self.encoder = self._load(ENCODER_TS, verify)
        self.step_module = self._load(STEP_TS, verify)

    def _load(self, name: str, verify: bool):
        if name not in self.manifest["files"]:
            raise ExportFormatError(f"{self.export_dir} has no TorchScript files: export with --torchscript "
                                    "to use this backend")
        data = read_verified(self.export_dir, self.manifest, name, verify)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)  # "torch.jit.load is deprecated": known
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
        self.device = torch.device(device) if device else default_device()
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


class Bf16EncoderBackend(Backend):
    """Mixed precision: the eager encoder under bf16 autocast (outputs back to fp32), another backend's fp32 step.

    ``--precision bf16`` pairs it with the ORT step; the benchmarks also pair it with the eager step."""

    def __init__(self, eager: EagerBackend, stepper: Backend, name: str = "bf16"):
        self.name, self.eager, self.stepper = name, eager, stepper
        self.device, self.vocab, self.manifest = stepper.device, stepper.vocab, stepper.manifest
        self.preprocess = stepper.preprocess

    @property
    def decode_defaults(self) -> dict[str, Any]:
        return self.stepper.decode_defaults

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Encoded:
        images = self.check_images(images).to(self.eager.device)
        with torch.autocast(self.eager.device.type, dtype=torch.bfloat16):
            out = self.eager.model.encode(images)
        return Encoded(*(t.float().contiguous() for t in out))  # contiguous: the ORT step would copy each step

    def step(self, words, h, c, enc_out, enc_att):
        return self.stepper.step(words, h, c, enc_out, enc_att)

    def describe(self) -> str:
        return f"eager bf16 encoder + {self.stepper.describe()}"
