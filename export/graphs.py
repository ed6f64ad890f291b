"""Graphs out of a CaptionModel: ONNX (checked), fp16 variants on CUDA, TorchScript traces on request.

    python export/to_onnx.py --checkpoint RUN/best.pt --out exported/ [--fp16] [--torchscript]

The model's ``encode`` and ``step`` (core/model.py) become two graphs, :class:`EncodeGraph` and :class:`StepGraph`.
ONNX graphs come from the dynamo exporter (torch.export; dynamic N and M), opset 18 by default: the dynamo
exporter implements opset 18 ops, and down-conversion to 17 fails for the encoder with torch 2.14 (the legacy
TorchScript-based exporter runs only if dynamo fails). Every graph passes onnx.checker's full check.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.model import CaptionModel
from export import manifest as fmt

log = logging.getLogger("sat.export")

DEFAULT_OPSET = 18
MAX_N = 8192  # upper bound of the dynamic dimensions declared to torch.export
ENCODER_DYNAMIC = {0: "N"}  # input position -> name of its dynamic first dimension
STEP_DYNAMIC = {0: "M", 1: "M", 2: "M", 3: "N", 4: "N"}


class ExportError(RuntimeError):
    """The export failed or did not validate (the message says which graph and why)."""


class EncodeGraph(nn.Module):
    """``encode`` as a module with plain tensor outputs: the graph exported to ONNX and TorchScript."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(self.model.encode(images))


class StepGraph(nn.Module):
    """``step`` as a module: the single decoder step that is exported."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, words: Tensor, h: Tensor, c: Tensor, enc_out: Tensor, enc_att: Tensor):
        return self.decoder.step(words, h, c, enc_out, enc_att)


class HalfEncodeGraph(nn.Module):
    """float32 images in, float32 outputs out, float16 inside (the --fp16 graphs, CUDA only)."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        return tuple(t.float() for t in self.model.encode(images.half()))


class HalfStepGraph(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, words, h, c, enc_out, enc_att):
        logprobs, h, c, alpha = self.decoder.step(words, h.half(), c.half(), enc_out.half(), enc_att.half())
        return logprobs.float(), h.float(), c.float(), alpha.float()


def example_inputs(model: CaptionModel, n: int = 2, k: int = 3, device: str | torch.device = "cpu", seed: int = 0):
    """Images for the encoder and step inputs with N=n, M=n*k (not 0/1, so torch.export keeps them symbolic)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        enc = model.encode(images.to(device))
    words = torch.randint(0, cfg.vocab_size, (n * k,), generator=g)
    step_args = (words.to(device), enc.h.repeat_interleave(k, 0), enc.c.repeat_interleave(k, 0), enc.enc_out, enc.enc_att)
    return images.to(device), tuple(step_args)


# ------------------------------------------------------------------------------------------------ ONNX
def _export_dynamo(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic: dict[int, str],
                   opset: int, out_batch: str) -> None:
    dims = {name: torch.export.Dim(name, min=1, max=MAX_N) for name in set(dynamic.values())}
    dynamic_shapes = tuple({0: dims[dynamic[i]]} if i in dynamic else None for i in range(len(args)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
            output_names=list(output_names), dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
    program.save(str(path), external_data=None)  # external data only for > 2 GB models
    _name_output_batch_dims(path, out_batch)


def _export_legacy(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic: dict[int, str],
                   opset: int, out_batch: str) -> None:
    axes = {input_names[i]: {0: name} for i, name in dynamic.items()}
    axes.update({out: {0: out_batch} for out in output_names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)


def export_onnx_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic: dict[int, str],
                      opset: int, out_batch: str) -> dict[str, Any]:
    """Export with the dynamo exporter (dynamic axes from torch.export.Dim); legacy exporter only as a fallback.

    ``dynamic`` maps input position -> name of its dynamic first dimension ("N" or "M"); ``out_batch`` names the
    first dimension of every output. Returns the checked graph's opset, signature and ops.
    """
    module = module.eval()
    spec = (module, args, path, input_names, output_names, dynamic, opset, out_batch)
    t0 = time.perf_counter()
    errors = []
    try:
        _export_dynamo(*spec)
        exporter = "dynamo"
    except Exception as e:  # noqa: BLE001 - reported, and the other exporter tried
        errors.append(f"dynamo exporter: {type(e).__name__}: {str(e)[:2000]}")
        log.warning("dynamo export of %s failed (%s); trying the legacy exporter", path.name, type(e).__name__)
        try:
            _export_legacy(*spec)
            exporter = "legacy"
        except Exception as e2:  # noqa: BLE001
            errors.append(f"legacy exporter: {type(e2).__name__}: {str(e2)[:2000]}")
            raise ExportError(f"cannot export {path.name} to ONNX:\n  " + "\n  ".join(errors)) from e2
    seconds = time.perf_counter() - t0
    info = check_onnx(path)
    if info["opset"] != opset:
        raise ExportError(
            f"{path.name}: opset {opset} requested but the {exporter} exporter produced opset {info['opset']} "
            f"(torch {torch.__version__} implements ONNX ops from opset {DEFAULT_OPSET}); use --opset {info['opset']}"
        )
    info.update(exporter=exporter, export_seconds=round(seconds, 2))
    if errors:
        info["dynamo_error"] = errors[0]
    return info


def _name_output_batch_dims(path: Path, name: str) -> None:
    """torch.export names some output dims by expression (alpha: 'N*((M//N))'); call them what they are."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for out in model.graph.output:
        dim = out.type.tensor_type.shape.dim[0]
        if dim.dim_param and dim.dim_param != name:
            dim.dim_param, changed = name, True
    if changed and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        onnx.save(model, str(path))


def check_onnx(path: Path) -> dict[str, Any]:
    """onnx.checker with full_check (shape inference included), then the graph's opset, ops and signature."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # ValidationError, InferenceError
        raise ExportError(f"{path.name} does not pass onnx.checker.check_model(full_check=True): {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))

    def sig(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    return {
        "opset": opset,
        "inputs": sig(model.graph.input),
        "outputs": sig(model.graph.output),
        "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
    }


def ort_optimized_ops(path: Path) -> dict[str, int]:
    """Op types after ONNX Runtime's ORT_ENABLE_ALL optimizations on CPU (what actually runs)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        so.intra_op_num_threads = 1
        so.log_severity_level = 3  # no "hardware specific optimizations" notice: this copy is only inspected
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def export_pair(encode: nn.Module, step: nn.Module, images: Tensor, step_args: tuple, out: Path, opset: int,
                files: tuple[str, str], suffix: str = "") -> dict[str, Any]:
    """The encoder and step graphs into ``out``: {"encoder<suffix>": info, "decoder_step<suffix>": info}."""
    encoder_file, step_file = files
    return {
        f"encoder{suffix}": {"file": encoder_file, **export_onnx_graph(
            encode, (images,), out / encoder_file, fmt.ENCODER_INPUTS, fmt.ENCODER_OUTPUTS, ENCODER_DYNAMIC,
            opset, "N")},
        f"decoder_step{suffix}": {"file": step_file, **export_onnx_graph(
            step, step_args, out / step_file, fmt.STEP_INPUTS, fmt.STEP_OUTPUTS, STEP_DYNAMIC, opset, "M")},
    }


def export_fp32(model: CaptionModel, out: Path, opset: int, seed: int) -> dict[str, Any]:
    """encoder.onnx and decoder_step.onnx, with the ops ONNX Runtime runs after its optimizations."""
    images, step_args = example_inputs(model, seed=seed)
    log.info("exporting %s and %s (opset %d)", fmt.ENCODER_ONNX, fmt.STEP_ONNX, opset)
    graphs = export_pair(EncodeGraph(model), StepGraph(model), images, step_args, out, opset,
                         (fmt.ENCODER_ONNX, fmt.STEP_ONNX))
    for info in graphs.values():
        info["ort_optimized_ops"] = ort_optimized_ops(out / info["file"])
    return graphs


def export_fp16(model: CaptionModel, out: Path, opset: int, seed: int) -> dict[str, Any]:
    """Half-precision graphs exported from the model on CUDA (float32 interface, float16 compute)."""
    half = copy.deepcopy(model).cuda().half().eval()
    images, step_args = example_inputs(model, seed=seed)
    step_args = tuple(t.cuda().float() if t.is_floating_point() else t.cuda() for t in step_args)
    log.info("exporting %s and %s", fmt.ENCODER_FP16_ONNX, fmt.STEP_FP16_ONNX)
    graphs = export_pair(HalfEncodeGraph(half), HalfStepGraph(half), images.cuda(), step_args, out, opset,
                         (fmt.ENCODER_FP16_ONNX, fmt.STEP_FP16_ONNX), suffix="_fp16")
    del half
    torch.cuda.empty_cache()
    return {"graphs": graphs, "method": "model.half() on CUDA, exported with float32 inputs/outputs"}


# ------------------------------------------------------------------------------------------- TorchScript
def export_torchscript(model: CaptionModel, out: Path, seed: int) -> dict[str, Any]:
    """encoder.ts and decoder_step.ts by torch.jit.trace (TorchScript is deprecated upstream: only on request)."""
    images, step_args = example_inputs(model, seed=seed)
    log.info("tracing TorchScript %s, %s", fmt.ENCODER_TS, fmt.STEP_TS)
    graphs = {}
    for key, module, args, name in (("encoder_ts", EncodeGraph(model), (images,), fmt.ENCODER_TS),
                                    ("decoder_step_ts", StepGraph(model), step_args, fmt.STEP_TS)):
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation notices of torch.jit
            torch.jit.save(torch.jit.trace(module.eval(), args, check_trace=False), str(out / name))
        graphs[key] = {"file": name, "method": "torch.jit.trace", "legacy": True,
                       "export_seconds": round(time.perf_counter() - t0, 2)}
    return graphs
