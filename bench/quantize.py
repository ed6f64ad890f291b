"""A faster encoder path for the benchmark: static int8 quantization of the exported encoder (CPU).

The export ships fp32 encoder.onnx (and an int8 decoder step). ONNX Runtime runs int8 convolutions (u8
activations x s8 weights) faster than fp32 (several times with VNNI), and the ResNet encoder is most of the
end-to-end time when many images are captioned at once. This module quantizes the benchmark's own encoder.onnx
(QDQ format, Conv only, weights per channel, activation ranges from a few calibration images that are not the
benchmark's inputs) so the suite can time that path and report its caption agreement with eager fp32. The weight
range is the export's own choice (``core.hardware.choose_int8``: 7-bit weights, exact without VNNI). It is a
measurement for the export's authors, not a shipped format.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from core import hardware
from core.decode import Encoded

ENCODER_OUTPUTS = ("enc_out", "enc_att", "h", "c")


def quantize_encoder(src: Path, dst: Path, calib_images: torch.Tensor) -> Path:
    """encoder.onnx -> int8 QDQ encoder (convolutions quantized; the Linear tail and pooling stay fp32)."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    choice = hardware.choose_int8(hardware.detect())
    logging.getLogger("bench").info("int8 encoder weight format: %s", choice)
    batches = [{"images": calib_images[i : i + 1].numpy()} for i in range(calib_images.shape[0])]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

    root = logging.getLogger()
    was = root.level
    root.setLevel(logging.ERROR)  # quiet the quantizer's advice
    try:
        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "encoder.pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                per_channel=True, reduce_range=choice.value == "reduce_range", activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        root.setLevel(was)
    return dst


class OrtInt8Encoder:
    """encode() through an int8 encoder session (CPU provider)."""

    name = "ort_int8_encoder"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.device = torch.device("cpu")

    def encode(self, images: torch.Tensor) -> Encoded:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        outs = self.session.run(list(ENCODER_OUTPUTS), {"images": x})
        return Encoded(*(torch.from_numpy(o) for o in outs))
