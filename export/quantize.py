"""int8 graphs: the encoder by static quantization (QDQ, calibrated on images), the decoder step by dynamic.

    python export/to_onnx.py --checkpoint RUN/best.pt --out exported/ --quantize int8
    # writes encoder.int8.onnx and decoder_step.int8.onnx

Encoder: ``quantize_static`` in QDQ format, int8 weights per output channel, uint8 activations whose ranges come
from calibration images (the training data's); ONNX Runtime fuses the QDQ pairs into QLinearConv / QLinearAdd
(listed in the manifest as ``ort_optimized_ops``: what really runs). Its small Linear tail (encoder_att, init_h,
init_c) stays fp32. Step: Gemm -> MatMul rewrite, then dynamic quantization; the attention's full_att (one output
column) and the output layer fc stay fp32: they decide the word ranking, and keeping them costs no speed.
The weight format comes from ``core.hardware.choose_int8`` and is recorded in the manifest.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from core import hardware
from export.graphs import ExportError, check_onnx, ort_optimized_ops

log = logging.getLogger("sat.export")


def _widths(model) -> dict[str, int]:
    """Static width (dim 1) of every 2-D value the shape inference knows."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    widths = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            widths[v.name] = dims[1].dim_value
    return widths


def _parts(node, w: np.ndarray, producers: dict, widths: dict[str, int]) -> list[tuple[str, np.ndarray]]:
    """(input, weight rows) pairs: one per part when the input is a feature-axis Concat of known widths."""
    from onnx import helper

    src = producers.get(node.input[0])
    if src is None or src.op_type != "Concat":
        return [(node.input[0], w)]
    axis = next(helper.get_attribute_value(a) for a in src.attribute if a.name == "axis")
    sizes = [widths.get(i) for i in src.input]
    if axis not in (1, -1) or None in sizes or sum(sizes) != w.shape[0]:
        return [(node.input[0], w)]
    offsets = np.cumsum([0, *sizes])
    return [(i, w[offsets[j]: offsets[j + 1]]) for j, i in enumerate(src.input)]


def _matmul_nodes(model, node, parts: list[tuple[str, np.ndarray]]) -> list:
    """MatMul per part (weights added to the model), summed with the bias into the Gemm's output."""
    from onnx import helper, numpy_helper

    nodes, terms = [], []
    for j, (x, wj) in enumerate(parts):
        w_name = f"{node.input[1]}__matmul{j}"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wj), w_name))
        terms.append(f"{node.output[0]}__mm{j}")
        nodes.append(helper.make_node("MatMul", [x, w_name], [terms[-1]], name=f"{node.name}_MatMul{j}"))
    if len(node.input) > 2 and node.input[2]:
        terms.append(node.input[2])
    acc = terms[0]
    for j, t in enumerate(terms[1:]):
        out = node.output[0] if j == len(terms) - 2 else f"{node.output[0]}__sum{j}"
        nodes.append(helper.make_node("Add", [acc, t], [out], name=f"{node.name}_Add{j}"))
        acc = out
    if acc != node.output[0]:  # a lone MatMul without bias: rename its output
        nodes[-1].output[0] = node.output[0]
    return nodes


def gemm_to_matmul(model):
    """Rewrite Gemm(A, W, b) with constant W as MatMul(A, W') + b, W' pre-transposed: (model, rewritten count).

    ONNX Runtime's dynamic quantization covers MatMul (-> MatMulInteger / DynamicQuantizeMatMul) but not Gemm,
    which is what the exporter emits for nn.Linear and the LSTM cell's matmuls.

    A Gemm fed by a Concat of activations along the features, like the LSTM cell's [embedding, gated attention]
    input, becomes one MatMul per part (summed): dynamic quantization picks one uint8 scale per activation
    tensor, and one scale over the concatenation would crush the small embedding values next to the large
    attention-weighted features.
    """
    import onnx
    from onnx import helper, numpy_helper

    widths = _widths(model)
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
        w = w.T if attrs.get("transB", 0) else w
        new_nodes += _matmul_nodes(model, node, _parts(node, w, producers, widths))
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


def _weight_matmuls(model, ops: tuple[str, ...] = ("MatMul",)) -> list[str]:
    """Names of the ``ops`` nodes whose second input is a weight (an initializer)."""
    const = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in ops and n.input[1] in const]


def _kept_float(model) -> list[str]:
    """Weight matmuls of the step that stay fp32: fc (its weight is named after it) and full_att (one column)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    kept = []
    for name in _weight_matmuls(model):
        node = next(n for n in model.graph.node if n.name == name)
        w = inits[node.input[1]]
        if ".fc.weight" in w.name or numpy_helper.to_array(w).shape[-1] == 1:
            kept.append(name)
    return kept


def quantize_step_int8(src: Path, dst: Path, choice: hardware.Choice | None = None) -> dict[str, Any]:
    """Dynamic int8 quantization of the decoder step: weights int8 per channel, activations uint8 per call.

    The weight range comes from ``core.hardware.choose_int8``: 7-bit weights (``reduce_range``) keep ONNX Runtime's
    u8s8 kernels exact on CPUs without VNNI, where full-range weights saturate VPMADDUBSW's 16-bit sums.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    choice = choice or hardware.choose_int8(hardware.detect())
    log.info("quantizing the decoder step to int8 (dynamic); weight format: %s", choice.value)
    model, rewritten = gemm_to_matmul(onnx.load(str(src)))
    kept = _kept_float(model)
    weight_matmuls = [n for n in _weight_matmuls(model) if n not in kept]
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
    quantized = onnx.load(str(dst))
    missing = sorted(set(kept) - {n.name for n in quantized.graph.node})  # quantize_dynamic keeps node names
    if missing:
        raise ExportError(f"int8 step: the fp32 matmuls {missing} were not kept")
    info = check_onnx(dst)
    left = [n for n in _weight_matmuls(quantized, ("MatMul", "Gemm")) if n not in kept]
    info.update(
        method="onnxruntime.quantization.quantize_dynamic (weights int8 per channel, activations uint8 dynamic)",
        kept_float=kept,
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


def _encoder_tail(model) -> list[str]:
    """The encoder's Linear tail after pooling (MatMul/Gemm: encoder_att, init_h, init_c): kept fp32."""
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]


def quantize_encoder_int8(src: Path, dst: Path, calib_images, choice: hardware.Choice | None = None,
                          batch: int = 8) -> dict[str, Any]:
    """Static int8 quantization of the encoder (QDQ): per-channel int8 weights, uint8 activations calibrated
    (MinMax) on ``calib_images`` [N,3,S,S], images of the training data, never the ones it is validated on."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    choice = choice or hardware.choose_int8(hardware.detect())
    log.info("quantizing the encoder to int8 (static QDQ, %d calibration images); weight format: %s",
             len(calib_images), choice.value)
    feeds = [{"images": calib_images[i: i + batch].numpy()} for i in range(0, len(calib_images), batch)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "encoder.pre.onnx"
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # quiet the quantizer's advice
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            tail = _encoder_tail(onnx.load(str(pre)))
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=choice.value == "reduce_range", activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=tail)
        finally:
            logging.getLogger().disabled = was
    info = check_onnx(dst)
    optimized = ort_optimized_ops(dst)
    convs = int(check_onnx(src)["ops"].get("Conv", 0))
    info.update(method="onnxruntime.quantization.quantize_static (QDQ; weights int8 per channel, activations uint8 "
                       "calibrated by MinMax)", weight_format=choice.value, weight_format_reason=choice.reason,
                exported_on=hardware.capability_tag(), calibration_images=len(calib_images), kept_float=tail,
                ort_optimized_ops=optimized, convs=convs, int8_convs=int(optimized.get("QLinearConv", 0)))
    if info["int8_convs"] != convs:
        raise ExportError(f"int8 encoder: ONNX Runtime runs {info['int8_convs']} of {convs} convolutions in int8 "
                          f"({optimized})")
    return info
