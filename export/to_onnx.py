"""Export a trained captioning model for deployment: ONNX (+ TorchScript, legacy), vocabulary, manifest, parity.

    python export/to_onnx.py --checkpoint runs/x/best.pt --out exported/ [--quantize int8] [--fp16]

Defaults: the newest runs/**/best.pt, out ``exported/``. Writes (see export/manifest.py for the format)::

    encoder.onnx        images [N,3,S,S] -> enc_out [N,P,C], enc_att [N,P,A], h [N,D], c [N,D]
    decoder_step.onnx   words [M], h, c [M,D], enc_out [N,P,C], enc_att [N,P,A] -> logprobs [M,V], h, c, alpha [M,P]
    encoder.ts, decoder_step.ts   TorchScript traces (legacy), model.safetensors + model.json (eager backend),
    vocab.json, manifest.json     [decoder_step.int8.onnx with --quantize int8, *.fp16.onnx with --fp16 on CUDA]

ONNX graphs come from the dynamo exporter (torch.export; dynamic N and M), opset 18 by default: the dynamo
exporter implements opset 18 ops, and down-conversion to 17 fails for the encoder with torch 2.14 (it falls
back to the legacy TorchScript-based exporter only if dynamo fails). Every graph is checked
(onnx.checker full_check), run through ONNX Runtime and TorchScript at several batch and beam sizes, and
compared with eager PyTorch; the figures go into the manifest and the export fails (exit 1, nothing
replaced) when a backend is off by more than the tolerance. The output directory is written next to its
destination and renamed into place only once everything passed.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python export/to_onnx.py`
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from core import hardware  # noqa: E402
from core.decode import Encoded, beam_search  # noqa: E402
from core.model import CaptionModel, EncodeGraph, StepGraph  # noqa: E402
from core.vocab import Vocabulary  # noqa: E402
from export import manifest as fmt  # noqa: E402
from export.runtime import (  # noqa: E402
    DEFAULT_MAX_LEN,
    EagerBackend,
    OrtBackend,
    TorchScriptBackend,
    configure_logging,
    cuda_visible,
    default_preprocess,
)

log = logging.getLogger("export")

DEFAULT_OPSET = 18
# Parity tolerances against eager fp32: a graph passes when max|x - ref| <= atol + rtol * max|ref| for every output.
TOLERANCE = {
    "encoder": {"atol": 0.0, "rtol": 1e-4},  # random-weight ResNet activations reach 1e5: relative
    "decoder_step": {"atol": 1e-4, "rtol": 1e-4},  # logprobs, alpha: absolute; h, c: relative to their range
}
ENCODER_BATCHES = (1, 3)
STEP_BATCHES = (1, 3, 8)
STEP_BEAMS = (1, 3, 5)
MAX_N = 8192  # upper bounds of the dynamic dimensions declared to torch.export


class ExportError(RuntimeError):
    """The export failed or did not validate (the message says which graph and why)."""


# ------------------------------------------------------------------------------------------------ graphs
class _HalfEncode(nn.Module):
    """float32 images in, float32 outputs out, float16 inside (for --fp16 on CUDA)."""

    def __init__(self, model: CaptionModel):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        return tuple(t.float() for t in self.model.encode(images.half()))


class _HalfStep(nn.Module):
    def __init__(self, model: CaptionModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, words, h, c, enc_out, enc_att):
        logprobs, h, c, alpha = self.decoder.step(words, h.half(), c.half(), enc_out.half(), enc_att.half())
        return logprobs.float(), h.float(), c.float(), alpha.float()


def _example_inputs(model: CaptionModel, n: int = 2, k: int = 3, device: str | torch.device = "cpu", seed: int = 0):
    """Images for the encoder and step inputs with N=n, M=n*k (not 0/1, so torch.export keeps them symbolic)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        enc = model.encode(images.to(device))
    words = torch.randint(0, cfg.vocab_size, (n * k,), generator=g)
    step_args = (words.to(device), enc.h.repeat_interleave(k, 0), enc.c.repeat_interleave(k, 0), enc.enc_out, enc.enc_att)
    return images.to(device), tuple(step_args)


def export_onnx_graph(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic: dict[int, str],
                      opset: int, out_batch: str) -> dict[str, Any]:
    """Export with the dynamo exporter (dynamic axes from torch.export.Dim); legacy exporter only as a fallback.

    ``dynamic`` maps input position -> name of its dynamic first dimension ("N" or "M"); ``out_batch`` names the
    first dimension of every output.
    """
    module = module.eval()
    dims = {name: torch.export.Dim(name, min=1, max=MAX_N) for name in set(dynamic.values())}
    dynamic_shapes = tuple({0: dims[dynamic[i]]} if i in dynamic else None for i in range(len(args)))
    t0 = time.perf_counter()
    errors = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names), dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
            )
        program.save(str(path), external_data=None)  # external data only for > 2 GB models
        _name_output_batch_dims(path, out_batch)
        exporter = "dynamo"
    except Exception as e:  # noqa: BLE001 - we report it and try the other exporter
        errors.append(f"dynamo exporter: {type(e).__name__}: {str(e)[:2000]}")
        log.warning("dynamo export of %s failed (%s); trying the legacy exporter", path.name, type(e).__name__)
        try:
            axes = {}
            for i, name in dynamic.items():
                axes[input_names[i]] = {0: name}
            for out in output_names:
                axes[out] = {0: out_batch}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=axes, do_constant_folding=True)
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


def export_torchscript(module: nn.Module, args: tuple, path: Path) -> dict[str, Any]:
    """torch.jit.trace (legacy: TorchScript is deprecated upstream in favour of torch.export)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation notices of torch.jit
        traced = torch.jit.trace(module.eval(), args, check_trace=False)
        torch.jit.save(traced, str(path))
    return {"method": "torch.jit.trace", "legacy": True, "export_seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------ quantization
def gemm_to_matmul(model):
    """Rewrite Gemm(A, W, b) with constant W as MatMul(A, W') + b, W' pre-transposed.

    ONNX Runtime's dynamic quantization covers MatMul (-> MatMulInteger / DynamicQuantizeMatMul) but not Gemm,
    which is what the exporter emits for nn.Linear and the LSTM cell's matmuls.

    A Gemm fed by a Concat of activations along the features, like the LSTM cell's [embedding, gated attention]
    input, becomes one MatMul per part (summed): dynamic quantization picks one uint8 scale per activation
    tensor, and one scale over the concatenation would crush the small embedding values next to the large
    attention-weighted features.
    """
    import onnx
    from onnx import helper, numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model)
    widths = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            widths[v.name] = dims[1].dim_value
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    new_nodes, rewritten = [], 0
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        parts = [(node.input[0], w)]
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "Concat":
            axis = next(helper.get_attribute_value(a) for a in src.attribute if a.name == "axis")
            sizes = [widths.get(i) for i in src.input]
            if axis in (1, -1) and None not in sizes and sum(sizes) == w.shape[0]:
                offsets = np.cumsum([0, *sizes])
                parts = [(i, w[offsets[j]: offsets[j + 1]]) for j, i in enumerate(src.input)]
        terms = []
        for j, (x, wj) in enumerate(parts):
            w_name = f"{node.input[1]}__matmul{j}"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wj), w_name))
            terms.append(f"{node.output[0]}__mm{j}")
            new_nodes.append(helper.make_node("MatMul", [x, w_name], [terms[-1]], name=f"{node.name}_MatMul{j}"))
        if len(node.input) > 2 and node.input[2]:
            terms.append(node.input[2])
        acc = terms[0]
        for j, t in enumerate(terms[1:]):
            out = node.output[0] if j == len(terms) - 2 else f"{node.output[0]}__sum{j}"
            new_nodes.append(helper.make_node("Add", [acc, t], [out], name=f"{node.name}_Add{j}"))
            acc = out
        if acc != node.output[0]:  # a lone MatMul without bias: rename its output
            new_nodes[-1].output[0] = node.output[0]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(_live_nodes(new_nodes, {o.name for o in model.graph.output}))
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    return model, rewritten


def _live_nodes(nodes, outputs: set[str]):
    """Drop nodes whose outputs nobody reads (e.g. a Concat replaced by per-part matmuls)."""
    live, needed = [], set(outputs)
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def quantize_step_int8(src: Path, dst: Path, choice: hardware.Choice | None = None) -> dict[str, Any]:
    """Dynamic int8 quantization of the decoder step: weights int8 per channel, activations uint8 per call.

    The weight range comes from ``core.hardware.choose_int8``: 7-bit weights (``reduce_range``) keep ONNX Runtime's
    u8s8 kernels exact on CPUs without VNNI, where full-range weights saturate VPMADDUBSW's 16-bit sums.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    choice = choice or hardware.choose_int8(hardware.detect())
    log.info("int8 weight format: %s", choice)

    model, rewritten = gemm_to_matmul(onnx.load(str(src)))
    const = {t.name for t in model.graph.initializer}
    weight_matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in const]
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "step_matmul.onnx"
        onnx.save(model, str(plain))
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # quiet "consider pre-processing"
        try:
            quantize_dynamic(str(plain), str(dst), op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmuls,
                             per_channel=True, weight_type=QuantType.QInt8,
                             reduce_range=choice.value == "reduce_range", extra_options={"MatMulConstBOnly": True})
        finally:
            logging.getLogger().disabled = was
    info = check_onnx(dst)
    q = onnx.load(str(dst))
    left = [n.name for n in q.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in {t.name for t in q.graph.initializer}]
    info.update(
        method="onnxruntime.quantization.quantize_dynamic (weights int8 per channel, activations uint8 dynamic)",
        weight_format=choice.value,
        weight_format_reason=choice.reason,
        exported_on=hardware.capability_tag(),
        gemm_rewritten_to_matmul=rewritten,
        weight_matmuls=len(weight_matmuls),
        quantized_matmuls=int(info["ops"].get("MatMulInteger", 0)),
        float_weight_matmuls_left=left,
        ort_optimized_ops=ort_optimized_ops(dst),
    )
    if info["quantized_matmuls"] != len(weight_matmuls) or left:
        raise ExportError(f"int8 quantization left weight matmuls in float: {left} ({info['ops']})")
    return info


# ------------------------------------------------------------------------------------------------ parity
def _diff(x: Tensor, ref: Tensor) -> dict[str, float]:
    x, ref = x.detach().float().cpu(), ref.detach().float().cpu()
    if x.shape != ref.shape:
        raise ExportError(f"output shape {tuple(x.shape)} differs from eager {tuple(ref.shape)}")
    max_abs = float((x - ref).abs().max()) if x.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs}


def _within(d: dict[str, float], ref_scale: float, tol: dict[str, float]) -> bool:
    return d["max_abs"] <= tol["atol"] + tol["rtol"] * ref_scale


def parity_report(model: CaptionModel, backend, images: Tensor, tolerance=TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Compare a backend's encode and step with eager fp32 at several N (and k for the step)."""
    out: dict[str, Any] = {"encoder": [], "decoder_step": [], "failures": []}
    with torch.no_grad():
        for n in ENCODER_BATCHES:
            ref = model.encode(images[:n])
            got = backend.encode(images[:n].to(backend.device))
            row: dict[str, Any] = {"N": n}
            for name, a, b in zip(fmt.ENCODER_OUTPUTS, got, ref):
                d = _diff(a, b)
                row[name] = d
                if not _within(d, float(b.abs().max()), tolerance["encoder"]):
                    out["failures"].append(f"encoder N={n} {name}: max abs diff {d['max_abs']:.3g} (rel {d['rel']:.3g})")
            out["encoder"].append(row)
        full = model.encode(images)
        g = torch.Generator().manual_seed(seed)
        for n in STEP_BATCHES:
            enc = Encoded(*(t[:n] for t in full))
            for k in STEP_BEAMS:
                m = n * k
                words = torch.randint(0, model.cfg.vocab_size, (m,), generator=g)
                # perturb the start state so the k rows of an image differ, as beams do after a few steps
                h = enc.h.repeat_interleave(k, 0) + torch.randn(m, enc.h.shape[1], generator=g) * enc.h.std()
                c = enc.c.repeat_interleave(k, 0) + torch.randn(m, enc.c.shape[1], generator=g) * enc.c.std()
                ref = model.step(words, h, c, enc.enc_out, enc.enc_att)
                dev = backend.device
                got = backend.step(words.to(dev), h.to(dev), c.to(dev), enc.enc_out.to(dev), enc.enc_att.to(dev))
                row = {"N": n, "k": k}
                for name, a, b in zip(("logprobs", "h", "c", "alpha"), got, ref):
                    d = _diff(a, b)
                    row[name] = d
                    if not _within(d, float(b.abs().max()), tolerance["decoder_step"]):
                        out["failures"].append(
                            f"decoder_step N={n} k={k} {name}: max abs diff {d['max_abs']:.3g} (rel {d['rel']:.3g})")
                out["decoder_step"].append(row)
    out["worst"] = {
        "encoder_rel": max(r[o]["rel"] for r in out["encoder"] for o in fmt.ENCODER_OUTPUTS),
        "logprobs_max_abs": max(r["logprobs"]["max_abs"] for r in out["decoder_step"]),
        "alpha_max_abs": max(r["alpha"]["max_abs"] for r in out["decoder_step"]),
        "h_max_abs": max(r["h"]["max_abs"] for r in out["decoder_step"]),
        "c_rel": max(r["c"]["rel"] for r in out["decoder_step"]),
    }
    return out


def step_error_along_greedy(ref_backend, backend, images: Tensor, start_id: int, steps: int) -> dict[str, Any]:
    """Max differences of ``backend.step`` from ``ref_backend.step`` on the states of a real greedy decode.

    Both steps get the reference's inputs at every step (errors do not compound), so this measures the step
    itself on realistic states, e.g. the int8 step's quantization error; also the top-1 agreement.
    """
    enc = ref_backend.encode(images.to(ref_backend.device))
    words = torch.full((len(images),), start_id, dtype=torch.long, device=ref_backend.device)
    h, c = enc.h, enc.c
    out = {"logprobs_max_abs": 0.0, "h_max_abs": 0.0, "c_max_abs": 0.0, "alpha_max_abs": 0.0}
    agree = total = 0
    for _ in range(steps):
        ref = ref_backend.step(words, h, c, enc.enc_out, enc.enc_att)
        got = backend.step(words, h, c, enc.enc_out, enc.enc_att)
        for key, a, b in zip(("logprobs", "h", "c", "alpha"), got, ref):
            out[f"{key}_max_abs"] = max(out[f"{key}_max_abs"], float((a.float().cpu() - b.float().cpu()).abs().max()))
        agree += int((got[0].argmax(1).cpu() == ref[0].argmax(1).cpu()).sum())
        total += len(words)
        words, h, c = ref[0].argmax(1), ref[1], ref[2]
    out["top1_agreement_pct"] = round(100.0 * agree / total, 2)
    out["images"], out["steps"] = len(images), steps
    return out


def caption_agreement(ref_backend, backend, vocab: Vocabulary, images: Tensor, beam_size: int, max_len: int,
                      batch: int = 16, references: list | None = None, shared_encoder: bool = False) -> dict[str, Any]:
    """Beam-search captions of two backends on the same images: identical %, BLEU of one against the other."""
    from core.metrics import corpus_bleu_scores

    caps_ref, caps = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        enc_ref = ref_backend.encode(x.to(ref_backend.device))
        enc = enc_ref if shared_encoder else backend.encode(x.to(backend.device))
        for b, e, sink in ((ref_backend, enc_ref, caps_ref), (backend, enc, caps)):
            hyps = beam_search(e, b.step, beam_size, max_len, vocab.start_id, vocab.end_id)
            sink.extend(vocab.decode_tokens(h.tokens) for h in hyps)
    same = sum(a == b for a, b in zip(caps_ref, caps))
    out = {
        "images": len(caps),
        "beam_size": beam_size,
        "identical_captions": same,
        "identical_pct": round(100.0 * same / max(1, len(caps)), 2),
        "bleu4_vs_fp32": round(corpus_bleu_scores(caps, [[r] for r in caps_ref])["bleu4"], 4),
        "examples": [{"fp32": " ".join(a), "other": " ".join(b)} for a, b in zip(caps_ref, caps) if a != b][:3],
    }
    if references:
        out["bleu4_vs_references"] = {
            "fp32": round(corpus_bleu_scores(caps_ref, references)["bleu4"], 4),
            "other": round(corpus_bleu_scores(caps, references)["bleu4"], 4),
        }
    return out


# ------------------------------------------------------------------------------------------------ export
def _file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    entries = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != fmt.MANIFEST:
            entries[p.name] = {"sha256": fmt.sha256_file(p), "bytes": p.stat().st_size}
    return entries


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished export into place; only an empty dir or a previous export is ever replaced."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ExportError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / fmt.MANIFEST).is_file():
            raise ExportError(f"refusing to replace {out_dir}: it is not empty and holds no {fmt.MANIFEST}")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def export_model(
    model: CaptionModel,
    vocab: Vocabulary,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    fp16: bool = False,
    torchscript: bool = True,
    safetensors: bool = True,
    max_len: int = DEFAULT_MAX_LEN,
    beam_size: int = 5,
    calib_images: Tensor | None = None,
    calib_references: list | None = None,
    num_calib: int = 32,
    tolerance: dict | None = None,
    source: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``model`` into ``out_dir`` and return the manifest (also written as out_dir/manifest.json).

    Raises ExportError (nothing at ``out_dir`` is touched) when a graph fails the checker or parity.
    ``calib_images`` (preprocessed [N,3,S,S]) and ``calib_references`` (tokenized references per image) feed the
    int8 caption-agreement report; without them ``num_calib`` random images are used.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if len(vocab) != model.cfg.vocab_size:
        raise ExportError(f"vocabulary has {len(vocab)} words but the model expects {model.cfg.vocab_size}")
    tolerance = tolerance or TOLERANCE
    # a private fp32 CPU copy: the caller's model keeps its device, dtype and train/eval mode
    model = copy.deepcopy(getattr(model, "module", model)).eval().float().cpu()
    cfg = model.cfg
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    except OSError as e:
        raise ExportError(f"cannot create the export directory {out_dir}: {e.strerror or e}") from e
    t_start = time.perf_counter()
    keep_tmp = False  # a directory that failed parity is kept for inspection
    try:
        images, step_args = _example_inputs(model, seed=seed)
        graphs: dict[str, Any] = {}
        log.info("exporting %s (dynamo, opset %d)", fmt.ENCODER_ONNX, opset)
        graphs["encoder"] = export_onnx_graph(EncodeGraph(model), (images,), tmp / fmt.ENCODER_ONNX,
                                              fmt.ENCODER_INPUTS, fmt.ENCODER_OUTPUTS, {0: "N"}, opset, "N")
        graphs["encoder"]["file"] = fmt.ENCODER_ONNX
        log.info("exporting %s", fmt.STEP_ONNX)
        graphs["decoder_step"] = export_onnx_graph(StepGraph(model), step_args, tmp / fmt.STEP_ONNX, fmt.STEP_INPUTS,
                                                   fmt.STEP_OUTPUTS, {0: "M", 1: "M", 2: "M", 3: "N", 4: "N"}, opset, "M")
        graphs["decoder_step"]["file"] = fmt.STEP_ONNX
        for name in ("encoder", "decoder_step"):
            graphs[name]["ort_optimized_ops"] = ort_optimized_ops(tmp / graphs[name]["file"])
        if torchscript:
            log.info("tracing TorchScript (legacy) %s, %s", fmt.ENCODER_TS, fmt.STEP_TS)
            graphs["encoder_ts"] = {"file": fmt.ENCODER_TS, **export_torchscript(EncodeGraph(model), (images,), tmp / fmt.ENCODER_TS)}
            graphs["decoder_step_ts"] = {"file": fmt.STEP_TS, **export_torchscript(StepGraph(model), step_args, tmp / fmt.STEP_TS)}
        if quantize == "int8":
            log.info("quantizing the decoder step to int8 (dynamic)")
            graphs["decoder_step_int8"] = {"file": fmt.STEP_INT8_ONNX,
                                           **quantize_step_int8(tmp / fmt.STEP_ONNX, tmp / fmt.STEP_INT8_ONNX)}
        fp16_info: dict[str, Any] | None = None
        if fp16:
            if not cuda_visible():
                reason = "--fp16 needs a CUDA GPU (torch.cuda.is_available() is False); fp16 graphs were not exported"
                log.warning("fp16 skipped: %s", reason)
                fp16_info = {"skipped": reason}
            else:
                fp16_info = _export_fp16(model, tmp, opset, seed)
                graphs.update(fp16_info.pop("graphs"))
        vocab.save(tmp / fmt.VOCAB)
        if safetensors:
            from core.checkpoint import save_safetensors

            save_safetensors(model, vocab, tmp)

        manifest: dict[str, Any] = {
            "format": fmt.FORMAT,
            "format_version": fmt.FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_config": cfg.to_dict(),
            "dims": {
                "vocab_size": cfg.vocab_size,
                "encoded_size": cfg.encoded_size,
                "num_pixels": cfg.num_pixels,  # P
                "encoder_dim": cfg.encoder_dim,  # C
                "attention_dim": cfg.attention_dim,  # A
                "decoder_dim": cfg.decoder_dim,  # D
                "embed_dim": cfg.embed_dim,
            },
            "preprocess": default_preprocess(cfg.image_size),
            "tokens": {"pad_id": vocab.pad_id, "start_id": vocab.start_id, "end_id": vocab.end_id,
                       "unk_id": vocab.unk_id, "pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"},
            "decode": {"max_len": max_len, "beam_size": beam_size, "length_norm": 0.0},
            "io": {
                "encoder": {"inputs": {"images": "float32[N,3,S,S]"},
                            "outputs": {"enc_out": "float32[N,P,C]", "enc_att": "float32[N,P,A]",
                                        "h": "float32[N,D]", "c": "float32[N,D]"}},
                "decoder_step": {"inputs": {"words": "int64[M]", "h": "float32[M,D]", "c": "float32[M,D]",
                                            "enc_out": "float32[N,P,C]", "enc_att": "float32[N,P,A]"},
                                 "outputs": {"logprobs": "float32[M,V]", "h_next": "float32[M,D]",
                                             "c_next": "float32[M,D]", "alpha": "float32[M,P]"},
                                 "rows": "M = N*k, image-major: rows i*k..i*k+k-1 belong to image i"},
            },
            "opset": graphs["encoder"]["opset"],
            "exporter": {
                "onnx": "+".join(sorted({graphs[g]["exporter"] for g in ("encoder", "decoder_step")})),
                "torchscript": "torch.jit.trace (legacy: TorchScript is deprecated upstream in favour of torch.export)"
                if torchscript else None,
                "versions": _versions(),
            },
            "graphs": graphs,
            "files": _file_entries(tmp),
            "source": source or {},
        }
        if fp16_info is not None:
            manifest["fp16"] = fp16_info
        _write_json(tmp / fmt.MANIFEST, manifest)

        # ---- validation through the runtime itself (hash checks included)
        log.info("checking parity against eager PyTorch (N=%s encoder, N=%s x k=%s step)", ENCODER_BATCHES,
                 STEP_BATCHES, STEP_BEAMS)
        g = torch.Generator().manual_seed(seed + 1)
        parity_images = torch.randn(max(STEP_BATCHES), 3, cfg.image_size, cfg.image_size, generator=g)
        threads = torch.get_num_threads()  # the ORT sessions follow torch's thread count (--threads)
        ort_fp32 = OrtBackend(tmp, providers=["cpu"], threads=threads)
        parity: dict[str, Any] = {"reference": "eager PyTorch fp32 on CPU", "tolerance": tolerance,
                                  "onnx": parity_report(model, ort_fp32, parity_images, tolerance, seed)}
        if torchscript:
            parity["torchscript"] = parity_report(model, TorchScriptBackend(tmp, device="cpu"), parity_images,
                                                  tolerance, seed)
        failures = [f"{b}: {f}" for b in ("onnx", "torchscript") if b in parity for f in parity[b]["failures"]]
        if fp16_info is not None and "skipped" not in fp16_info:
            ort_fp16 = OrtBackend(tmp, providers=["cuda"], fp16=True)
            parity["fp16"] = parity_report(model, ort_fp16, parity_images, {
                "encoder": {"atol": 0.0, "rtol": 2e-2}, "decoder_step": {"atol": 5e-2, "rtol": 2e-2}}, seed)
            failures += [f"fp16: {f}" for f in parity["fp16"]["failures"]]
        manifest["parity"] = parity
        if failures:
            _write_json(tmp / fmt.MANIFEST, manifest)
            keep_tmp = True
            raise ExportError("exported graphs differ from eager PyTorch beyond tolerance:\n  " + "\n  ".join(failures[:20])
                              + f"\n(full report in {tmp / fmt.MANIFEST}, kept for inspection)")

        if calib_images is None:
            calib_images = torch.randn(num_calib, 3, cfg.image_size, cfg.image_size, generator=g)
            calib_source = f"{num_calib} random images (seed {seed + 1})"
        else:
            calib_source = f"{len(calib_images)} dataset images"
        parity["captions"] = caption_agreement(
            EagerBackend(model, vocab, device="cpu"), ort_fp32, vocab, parity_images, beam_size=3, max_len=max_len)
        if quantize == "int8":
            log.info("int8 caption agreement on %s", calib_source)
            ort_int8 = OrtBackend(tmp, providers=["cpu"], int8=True, threads=threads)
            manifest["quantization"] = {
                "int8": {**caption_agreement(ort_fp32, ort_int8, vocab, calib_images, beam_size, max_len,
                                             references=calib_references, shared_encoder=True),
                         "calibration_set": calib_source,
                         **{k: graphs["decoder_step_int8"][k] for k in ("weight_format", "weight_format_reason",
                                                                          "exported_on")},
                         "step_error_greedy": step_error_along_greedy(ort_fp32, ort_int8, calib_images[:16],
                                                                      vocab.start_id, max_len)},
            }
        if fp16_info and "skipped" not in fp16_info:
            ort_fp16 = OrtBackend(tmp, providers=["cuda"], fp16=True)
            fp16_info["captions"] = caption_agreement(ort_fp32, ort_fp16, vocab, calib_images, beam_size, max_len,
                                                      references=calib_references)
        manifest["export_seconds"] = round(time.perf_counter() - t_start, 1)
        _write_json(tmp / fmt.MANIFEST, manifest)
        _install(tmp, out_dir)
    except BaseException:
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s in %.1f s", out_dir, manifest["export_seconds"])
    return manifest


def _export_fp16(model: CaptionModel, tmp: Path, opset: int, seed: int) -> dict[str, Any]:
    """Half-precision graphs exported from the model on CUDA (float32 interface, float16 compute)."""
    half = copy.deepcopy(model).cuda().half().eval()
    images, step_args = _example_inputs(model, seed=seed)
    images = images.cuda()
    step_args = tuple(t.cuda().float() if t.is_floating_point() else t.cuda() for t in step_args)
    graphs = {
        "encoder_fp16": {"file": fmt.ENCODER_FP16_ONNX, **export_onnx_graph(
            _HalfEncode(half), (images,), tmp / fmt.ENCODER_FP16_ONNX, fmt.ENCODER_INPUTS, fmt.ENCODER_OUTPUTS,
            {0: "N"}, opset, "N")},
        "decoder_step_fp16": {"file": fmt.STEP_FP16_ONNX, **export_onnx_graph(
            _HalfStep(half), step_args, tmp / fmt.STEP_FP16_ONNX, fmt.STEP_INPUTS, fmt.STEP_OUTPUTS,
            {0: "M", 1: "M", 2: "M", 3: "N", 4: "N"}, opset, "M")},
    }
    del half
    torch.cuda.empty_cache()
    return {"graphs": graphs, "method": "model.half() on CUDA, exported with float32 inputs/outputs"}


# ---------------------------------------------------------------------------------------------------- CLI
def newest_checkpoint(root: Path = Path("runs")) -> Path:
    found = sorted(root.glob("**/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ExportError(f"no checkpoint given and no {root}/**/best.pt found: pass --checkpoint RUN/best.pt")
    return found[-1]


def _calibration(data_dir: Path, split: str, image_size: int, limit: int):
    from core.data import load_flickr8k
    from export.runtime import Preprocessor

    data = load_flickr8k(data_dir)
    names = data.splits[split][:limit]
    if not names:
        raise ExportError(f"{data_dir}: split {split!r} is empty")
    pre = Preprocessor(default_preprocess(image_size))
    from core.vocab import tokenize

    images = torch.stack([pre.load(data.image_path(n)) for n in names])
    refs = [[tokenize(c) for c in data.captions[n]] for n in names]
    return images, refs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python export/to_onnx.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--checkpoint", type=Path, default=None, help="checkpoint .pt (default: newest runs/**/best.pt)")
    p.add_argument("--out", type=Path, default=Path("exported"), help="export directory (default: exported/)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--quantize", choices=["int8"], default=None, help="also write an int8 dynamic-quantized decoder step")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (needs a CUDA GPU; skipped on CPU)")
    p.add_argument("--no-torchscript", action="store_true", help="skip the legacy TorchScript files")
    p.add_argument("--no-safetensors", action="store_true", help="skip model.safetensors (eager backend weights)")
    p.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="default caption length recorded in the manifest")
    p.add_argument("--beam", type=int, default=5, help="default beam size recorded (and used for int8 agreement)")
    p.add_argument("--calib-data", type=Path, default=None, help="Flickr8k-layout dataset for the int8/fp16 caption check")
    p.add_argument("--split", default="test", help="split of --calib-data (default test)")
    p.add_argument("--calib-images", type=int, default=32, help="number of images for the int8/fp16 caption check")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("export", logging.INFO)  # export and export.runtime; onnxscript's root chatter stays quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    from core.checkpoint import CheckpointError, model_from_checkpoint
    from core.data import DataFormatError, DatasetNotFoundError

    try:
        ckpt = args.checkpoint or newest_checkpoint()
        log.info("checkpoint %s", ckpt)
        model, vocab = model_from_checkpoint(ckpt)
        calib, refs = None, None
        if args.calib_data:
            calib, refs = _calibration(args.calib_data, args.split, model.cfg.image_size, args.calib_images)
        source = {"checkpoint": str(Path(ckpt).resolve()), "checkpoint_sha256": fmt.sha256_file(ckpt)}
        manifest = export_model(model, vocab, args.out, opset=args.opset, quantize=args.quantize, fp16=args.fp16,
                                torchscript=not args.no_torchscript, safetensors=not args.no_safetensors,
                                max_len=args.max_len, beam_size=args.beam, calib_images=calib, calib_references=refs,
                                num_calib=args.calib_images, source=source, seed=args.seed)
    except (ExportError, CheckpointError, DataFormatError, DatasetNotFoundError, fmt.ExportFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, file size limit, permissions: nothing was installed
        print(f"error: export to {args.out} failed: {e}", file=sys.stderr)
        return 1
    par = manifest["parity"]
    w = par["onnx"]["worst"]
    print(f"exported {args.out}: opset {manifest['opset']}, exporter {manifest['exporter']['onnx']}; "
          f"ONNX vs eager: encoder rel {w['encoder_rel']:.2e}, logprobs {w['logprobs_max_abs']:.2e}, "
          f"alpha {w['alpha_max_abs']:.2e}; beam-3 captions identical "
          f"{par['captions']['identical_pct']}%")
    if "torchscript" in par:
        w = par["torchscript"]["worst"]
        print(f"TorchScript vs eager: encoder rel {w['encoder_rel']:.2e}, logprobs {w['logprobs_max_abs']:.2e}")
    if "quantization" in manifest:
        q = manifest["quantization"]["int8"]
        print(f"int8 step: {q['identical_pct']}% identical captions, BLEU-4 vs fp32 {q['bleu4_vs_fp32']} "
              f"({q['calibration_set']}, beam {q['beam_size']})")
    if "fp16" in manifest and "skipped" in manifest["fp16"]:
        print(f"fp16: skipped ({manifest['fp16']['skipped']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
