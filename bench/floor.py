"""The hardware floor of a decoder step: the bytes it must read divided by the machine's memory bandwidth.

A decoder step over M = N x k rows reads, at the least, every weight of the step's layers once (the LSTM cell,
f_beta, fc, decoder_att, full_att), one embedding row per row, each image's enc_out and enc_att once (the k beams
share them), and h/c. Counted from the model's own parameters, so any shape config gets its floor. With the
tutorial's shapes the weights alone are about 36 MB, more than a typical CPU's L3 cache, so they stream from DRAM
every step.

Bandwidth is measured in the same run by copying a large array (bytes read + bytes written, divided by the time
of the fastest of a few copies).

    python bench/floor.py            # prints the floor for the full shapes
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
    del src, dst, src_np, dst_np
    fastest = min(best, key=best.get)
    return {
        "bandwidth_GBps": moved / best[fastest] / 1e9,
        "bandwidth_torch_GBps": moved / best["torch"] / 1e9,
        "bandwidth_numpy_GBps": moved / best["numpy"] / 1e9,
        "copy_MB": float(megabytes),
        "copy_with": fastest,
    }


def floor_ms(bytes_read: int, bandwidth_GBps: float) -> float:
    return bytes_read / (bandwidth_GBps * 1e9) * 1e3


if __name__ == "__main__":
    from bench.config import full_config

    cfg = full_config()
    model = CaptionModel(cfg.model)
    bw = measure_bandwidth(cfg.bandwidth_mb)
    print(f"memory bandwidth: {bw['bandwidth_GBps']:.1f} GB/s ({cfg.bandwidth_mb} MB copy)")
    for n in (1, cfg.images_large):
        b = step_bytes(model, n, cfg.beam_size)
        print(f"step {n}x{cfg.beam_size}: reads {b['read'] / 1e6:.1f} MB -> floor {floor_ms(b['read'], bw['bandwidth_GBps']):.2f} ms")
        for k, v in b["items"].items():
            print(f"    {k:22s} {v / 1e6:8.2f} MB")
