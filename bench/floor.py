"""Hardware floors: a decoder step's bytes over the memory bandwidth, the encoder's MACs over the arithmetic peak.

A decoder step over M = N x k rows reads, at the least, every weight of the step's layers once (the LSTM cell,
f_beta, fc, decoder_att, full_att), one embedding row per row, each image's enc_out and enc_att once (the k beams
share them), and h/c. Counted from the model's own parameters, so any shape config gets its floor. With the
tutorial's shapes the weights alone are about 36 MB, more than a typical CPU's L3 cache, so they stream from DRAM
every step.

Bandwidth is measured in the same run by copying a large array (bytes read + bytes written, divided by the time
of the fastest of a few copies).

The encoder is compute-bound: its floor is 2 x MACs (every Conv2d and Linear of ``encode``, counted by hooks on
one forward pass) over the peak of this CPU, measured in the same run: fp32 by a large torch matmul, int8 by ONNX
Runtime's own int8 GEMM (MatMulInteger, u8 x s8, the kernel family of its QLinearConv).

A training step's floor is its FLOPs (``train_step_flops``) over the same fp32 GEMM peak.

    python bench/floor.py            # prints the floors for the full shapes
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/floor.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from core.model import CaptionModel


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def step_bytes(model: CaptionModel, n_images: int, beam_size: int) -> dict[str, int]:
    """Bytes a step over n_images x beam_size rows must read, by item (plus its outputs written, for reference)."""
    dec = model.decoder
    cfg = model.cfg
    m = n_images * beam_size
    f32 = 4
    P, C, A, D, E, V = cfg.num_pixels, cfg.encoder_dim, cfg.attention_dim, cfg.decoder_dim, cfg.embed_dim, cfg.vocab_size
    reads = {
        "lstm (decode_step)": _param_bytes(dec.decode_step),
        "f_beta": _param_bytes(dec.f_beta),
        "fc": _param_bytes(dec.fc),
        "decoder_att": _param_bytes(dec.attention.decoder_att),
        "full_att": _param_bytes(dec.attention.full_att),
        "embedding rows": m * E * dec.embedding.weight.element_size(),
        "enc_out (per image)": n_images * P * C * f32,
        "enc_att (per image)": n_images * P * A * f32,
        "h, c": 2 * m * D * f32,
        "words": m * 8,
    }
    writes = {"logprobs": m * V * f32, "h, c out": 2 * m * D * f32, "alpha": m * P * f32}
    return {
        "read": sum(reads.values()),
        "written": sum(writes.values()),
        "weights": sum(reads[k] for k in ("lstm (decode_step)", "f_beta", "fc", "decoder_att", "full_att")),
        "items": reads,
    }


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth from a large array copy: (bytes read + bytes written) / time of the fastest copy.

    Copies with torch (intra-op threads) and with numpy (one thread) and keeps the faster: the floor is what the
    machine can do at least.
    """
    import numpy as np

    n = megabytes * 1024 * 1024 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    src_np, dst_np = src.numpy(), dst.numpy()
    best = {"torch": float("inf"), "numpy": float("inf")}
    for _ in range(repeats):
        for name, copy in (("torch", lambda: dst.copy_(src)), ("numpy", lambda: np.copyto(dst_np, src_np))):
            t0 = time.perf_counter()
            copy()
            best[name] = min(best[name], time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    fastest = min(best, key=best.get)
    return {
        "bandwidth_GBps": moved / best[fastest] / 1e9,
        "bandwidth_torch_GBps": moved / best["torch"] / 1e9,
        "bandwidth_numpy_GBps": moved / best["numpy"] / 1e9,
        "copy_MB": float(megabytes),
        "copy_with": fastest,
    }


def encoder_macs(model: CaptionModel) -> int:
    """Multiply-accumulates of ``model.encode`` on one image (Conv2d and Linear layers)."""
    macs = 0

    def count(module, inputs, output):
        nonlocal macs
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output.numel() * k
        else:
            macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
             and m is not model.decoder.fc]
    s = model.cfg.image_size
    try:
        with torch.inference_mode():
            model.encode(torch.zeros(1, 3, s, s, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return macs


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _int8_gemm_session(n: int, threads: int):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).integers(-64, 64, (n, n), dtype=np.int8), "w")
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "gemm", [a], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure_peak(threads: int, quick: bool = False) -> dict[str, float]:
    """Peak multiply-adds of this CPU: fp32 (torch.mm) and int8 (ONNX Runtime MatMulInteger), as GFLOP/s."""
    import numpy as np

    n, repeats = (512, 2) if quick else (2048, 5)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        fp32 = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9
    finally:
        torch.set_num_threads(prev)
    sess = _int8_gemm_session(n, threads)
    x = np.random.default_rng(1).integers(0, 255, (n, n), dtype=np.uint8)
    int8 = 2 * n**3 / _best_seconds(lambda: sess.run(None, {"a": x}), repeats) / 1e9
    return {"fp32_GFLOPs": fp32, "int8_GOPs": int8, "gemm_n": float(n), "threads": float(threads)}


def compute_floor_ms(macs: int, gflops: float) -> float:
    return 2 * macs / (gflops * 1e9) * 1e3


def floor_ms(bytes_read: int, bandwidth_GBps: float) -> float:
    return bytes_read / (bandwidth_GBps * 1e9) * 1e3


def train_step_flops(cfg, lengths: torch.Tensor, k: int, encoder_macs_per_image: int = 0) -> dict[str, float]:
    """FLOPs of the useful work of one training step: ``lengths`` (B*k,) captions, k per image, teacher forcing.

    Per caption and real (non-padding) step: the decoder step's matrix products (decoder_att, the energies and
    full_att, the weighted encoding, f_beta, the LSTM cell, fc); per image, once: the attention's encoder projection
    (encoder_att) and init_h/init_c. Backward = 2x forward (gradients of inputs and weights), except where the input
    is the frozen encoder's output (encoder_att: weights only). ``encoder_macs_per_image``: the frozen encoder's
    forward when the step runs it (0: from cached features). Elementwise work is left out: a floor.
    """
    P, C, A, D, E, V = cfg.num_pixels, cfg.encoder_dim, cfg.attention_dim, cfg.decoder_dim, cfg.embed_dim, cfg.vocab_size
    images = lengths.numel() // k
    steps = int((lengths - 1).sum())
    per_step = 2 * (D * A + P * A + P * A + P * C + D * C + (E + C + D) * 4 * D + D * V)
    decoder = 3 * steps * per_step + images * (2 * 2 * P * C * A + 3 * 2 * 2 * C * D)
    encoder = 2 * encoder_macs_per_image * images
    return {"decoder": float(decoder), "encoder": float(encoder), "total": float(decoder + encoder),
            "captions": float(lengths.numel())}


if __name__ == "__main__":
    from bench.config import full_config

    cfg = full_config()
    model = CaptionModel(cfg.model)
    bw = measure_bandwidth(cfg.bandwidth_mb)
    print(f"memory bandwidth: {bw['bandwidth_GBps']:.1f} GB/s ({cfg.bandwidth_mb} MB copy)")
    macs = encoder_macs(model)
    peak = measure_peak(cfg.num_threads)
    print(f"encoder: {macs / 1e9:.2f} GMACs per image; peak fp32 {peak['fp32_GFLOPs']:.0f} GFLOP/s -> floor "
          f"{compute_floor_ms(macs, peak['fp32_GFLOPs']):.1f} ms/image; int8 {peak['int8_GOPs']:.0f} GOP/s -> floor "
          f"{compute_floor_ms(macs, peak['int8_GOPs']):.1f} ms/image")
    for n in (1, cfg.images_large):
        b = step_bytes(model, n, cfg.beam_size)
        print(f"step {n}x{cfg.beam_size}: reads {b['read'] / 1e6:.1f} MB -> floor {floor_ms(b['read'], bw['bandwidth_GBps']):.2f} ms")
        for k, v in b["items"].items():
            print(f"    {k:22s} {v / 1e6:8.2f} MB")
