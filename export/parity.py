"""Parity of exported graphs with eager PyTorch, and caption agreement between backends: the manifest's figures.

    python export/to_onnx.py --checkpoint RUN/best.pt --out exported/    # runs every check below before publishing

The exported files are checked through the runtime itself (export/runtime/backends.py, hashes included): encode at
several N, step at several N x k, then beam-search captions. A graph passes when, for every output,
max|x - ref| <= atol + rtol * max|ref|; the export fails when one does not.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.decode import Encoded, beam_search
from core.model import CaptionModel
from core.vocab import Vocabulary
from export import manifest as fmt
from export.runtime.backends import EagerBackend, OrtBackend, TorchScriptBackend
from export.graphs import ExportError

log = logging.getLogger("sat.export")

# Tolerances against eager fp32.
TOLERANCE = {
    "encoder": {"atol": 0.0, "rtol": 1e-4},  # random-weight ResNet activations reach 1e5: relative
    "decoder_step": {"atol": 1e-4, "rtol": 1e-4},  # logprobs, alpha: absolute; h, c: relative to their range
}
# An int8 path is picked by default (--precision auto) only if it keeps the captions: on held-out images, this
# share of captions identical to fp32's, and BLEU-4 against the references within this distance of fp32's.
INT8_MIN_IDENTICAL_PCT = 95.0
INT8_MAX_BLEU4_DELTA = 0.01
FP16_TOLERANCE = {"encoder": {"atol": 0.0, "rtol": 2e-2}, "decoder_step": {"atol": 5e-2, "rtol": 2e-2}}
ENCODER_BATCHES = (1, 3)
STEP_BATCHES = (1, 3, 8)
STEP_BEAMS = (1, 3, 5)
STEP_NAMES = ("logprobs", "h", "c", "alpha")


def _diff(x: Tensor, ref: Tensor) -> dict[str, float]:
    x, ref = x.detach().float().cpu(), ref.detach().float().cpu()
    if x.shape != ref.shape:
        raise ExportError(f"output shape {tuple(x.shape)} differs from eager {tuple(ref.shape)}")
    max_abs = float((x - ref).abs().max()) if x.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return {"max_abs": max_abs, "rel": max_abs / scale if scale > 0 else max_abs}


def _compare(row: dict[str, Any], names, got, ref, tol: dict[str, float], where: str, failures: list[str]) -> dict:
    """Add each output's differences to ``row``; a failure line per output beyond ``tol``."""
    for name, a, b in zip(names, got, ref):
        d = row[name] = _diff(a, b)
        if d["max_abs"] > tol["atol"] + tol["rtol"] * float(b.abs().max()):
            failures.append(f"{where} {name}: max abs diff {d['max_abs']:.3g} (rel {d['rel']:.3g})")
    return row


def _encoder_rows(model: CaptionModel, backend, images: Tensor, tol, failures: list[str]) -> list[dict]:
    rows = []
    for n in ENCODER_BATCHES:
        ref = model.encode(images[:n])
        got = backend.encode(images[:n].to(backend.device))
        rows.append(_compare({"N": n}, fmt.ENCODER_OUTPUTS, got, ref, tol, f"encoder N={n}", failures))
    return rows


def _step_rows(model: CaptionModel, backend, images: Tensor, tol, seed: int, failures: list[str]) -> list[dict]:
    full = model.encode(images)
    g = torch.Generator().manual_seed(seed)
    dev, rows = backend.device, []
    for n in STEP_BATCHES:
        enc = Encoded(*(t[:n] for t in full))
        for k in STEP_BEAMS:
            m = n * k
            words = torch.randint(0, model.cfg.vocab_size, (m,), generator=g)
            # perturb the start state so the k rows of an image differ, as beams do after a few steps
            h = enc.h.repeat_interleave(k, 0) + torch.randn(m, enc.h.shape[1], generator=g) * enc.h.std()
            c = enc.c.repeat_interleave(k, 0) + torch.randn(m, enc.c.shape[1], generator=g) * enc.c.std()
            ref = model.step(words, h, c, enc.enc_out, enc.enc_att)
            got = backend.step(words.to(dev), h.to(dev), c.to(dev), enc.enc_out.to(dev), enc.enc_att.to(dev))
            rows.append(_compare({"N": n, "k": k}, STEP_NAMES, got, ref, tol, f"decoder_step N={n} k={k}", failures))
    return rows


def parity_report(model: CaptionModel, backend, images: Tensor, tolerance=TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Compare a backend's encode and step with eager fp32 at several N (and k for the step)."""
    failures: list[str] = []
    with torch.no_grad():
        enc_rows = _encoder_rows(model, backend, images, tolerance["encoder"], failures)
        step_rows = _step_rows(model, backend, images, tolerance["decoder_step"], seed, failures)
    worst = {
        "encoder_rel": max(r[o]["rel"] for r in enc_rows for o in fmt.ENCODER_OUTPUTS),
        "logprobs_max_abs": max(r["logprobs"]["max_abs"] for r in step_rows),
        "alpha_max_abs": max(r["alpha"]["max_abs"] for r in step_rows),
        "h_max_abs": max(r["h"]["max_abs"] for r in step_rows),
        "c_rel": max(r["c"]["rel"] for r in step_rows),
    }
    return {"encoder": enc_rows, "decoder_step": step_rows, "failures": failures, "worst": worst}


def step_error_along_greedy(ref_backend, backend, images: Tensor, start_id: int, steps: int) -> dict[str, Any]:
    """Max differences of ``backend.step`` from ``ref_backend.step`` on the states of a real greedy decode.

    Both steps get the reference's inputs at every step (errors do not compound), so this measures the step
    itself on realistic states, e.g. the int8 step's quantization error; also the top-1 agreement.
    """
    enc = ref_backend.encode(images.to(ref_backend.device))
    words = torch.full((len(images),), start_id, dtype=torch.long, device=ref_backend.device)
    h, c = enc.h, enc.c
    out = {f"{key}_max_abs": 0.0 for key in STEP_NAMES}
    agree = total = 0
    for _ in range(steps):
        ref = ref_backend.step(words, h, c, enc.enc_out, enc.enc_att)
        got = backend.step(words, h, c, enc.enc_out, enc.enc_att)
        for key, a, b in zip(STEP_NAMES, got, ref):
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


# ------------------------------------------------------------------------------- the checks of one export
def ort_backends(export_dir: Path, fp16: bool) -> tuple[OrtBackend, OrtBackend | None]:
    """The fp32 CPU backend (and the fp16 CUDA one) that every check of an export shares: hashed and built once.
    Their sessions follow torch's thread count (--threads)."""
    return (OrtBackend(export_dir, providers=["cpu"], threads=torch.get_num_threads()),
            OrtBackend(export_dir, providers=["cuda"], fp16=True) if fp16 else None)


def check_graphs(model: CaptionModel, export_dir: Path, ort_fp32: OrtBackend, ort_fp16: OrtBackend | None,
                 images: Tensor, tolerance, seed: int, torchscript: bool) -> tuple[dict[str, Any], list[str]]:
    """Parity of every exported fp32 (and fp16) graph with eager: (the manifest's ``parity`` section, failures)."""
    log.info("checking parity against eager PyTorch (N=%s encoder, N=%s x k=%s step)", ENCODER_BATCHES,
             STEP_BATCHES, STEP_BEAMS)
    parity: dict[str, Any] = {"reference": "eager PyTorch fp32 on CPU", "tolerance": tolerance,
                              "onnx": parity_report(model, ort_fp32, images, tolerance, seed)}
    if torchscript:
        parity["torchscript"] = parity_report(model, TorchScriptBackend(export_dir, device="cpu"), images,
                                              tolerance, seed)
    if ort_fp16 is not None:
        parity["fp16"] = parity_report(model, ort_fp16, images, FP16_TOLERANCE, seed)
    failures = [f"{b}: {f}" for b in ("onnx", "torchscript", "fp16") if b in parity for f in parity[b]["failures"]]
    return parity, failures


def check_captions(model: CaptionModel, vocab: Vocabulary, export_dir: Path, ort_fp32: OrtBackend,
                   ort_fp16: OrtBackend | None, images: Tensor, calib: Tensor, calib_source: str,
                   calib_references: list | None, beam_size: int, max_len: int, int8: bool) -> dict[str, Any]:
    """Caption agreement: fp32 ONNX vs eager on ``images``; int8 and fp16 vs fp32 ONNX on the calibration set."""
    out: dict[str, Any] = {"captions": caption_agreement(EagerBackend(model, vocab, device="cpu"), ort_fp32, vocab,
                                                         images, beam_size=3, max_len=max_len)}
    if int8:
        out.update(check_int8(export_dir, vocab, ort_fp32, calib, calib_source, calib_references, beam_size, max_len))
    if ort_fp16 is not None:
        out["fp16"] = caption_agreement(ort_fp32, ort_fp16, vocab, calib, beam_size, max_len,
                                        references=calib_references)
    return out


def judge_int8(record: dict[str, Any]) -> tuple[bool, str]:
    """Whether an int8 path keeps the captions (the thresholds above), and the figures that say so."""
    pct = record["identical_pct"]
    refs = record.get("bleu4_vs_references")
    delta = round(refs["other"] - refs["fp32"], 4) if refs else None
    record["bleu4_delta_vs_references"] = delta
    why = f"{pct}% identical captions on {record['images']} held-out images"
    why += f", BLEU-4 {delta:+.4f} vs fp32 against the references" if delta is not None else ", no reference captions"
    ok = pct >= INT8_MIN_IDENTICAL_PCT and (delta is None or abs(delta) <= INT8_MAX_BLEU4_DELTA)
    record["thresholds"] = {"min_identical_pct": INT8_MIN_IDENTICAL_PCT, "max_abs_bleu4_delta": INT8_MAX_BLEU4_DELTA}
    return ok, why


def check_int8(export_dir: Path, vocab: Vocabulary, ort_fp32: OrtBackend, images: Tensor, source: str,
               references: list | None, beam_size: int, max_len: int) -> dict[str, Any]:
    """The int8 step alone (fp32 encoder) and the shipped int8 path (int8 encoder + int8 step) against fp32 ONNX
    on held-out images: {"int8": step record, "int8_path": path record}, each with ``validated`` and ``why``."""
    threads = torch.get_num_threads()
    out: dict[str, Any] = {}
    for key, enc8 in (("int8", False), ("int8_path", True)):
        log.info("int8 caption agreement (%s) on %s", "encoder + step" if enc8 else "step", source)
        backend = OrtBackend(export_dir, providers=["cpu"], int8=True, int8_encoder=enc8, threads=threads)
        rec = {**caption_agreement(ort_fp32, backend, vocab, images, beam_size, max_len, references=references,
                                   shared_encoder=not enc8), "check_set": source}
        if not enc8:
            rec["step_error_greedy"] = step_error_along_greedy(ort_fp32, backend, images[:16], vocab.start_id, max_len)
        rec["validated"], rec["why"] = judge_int8(rec)
        if not rec["validated"]:
            log.warning("int8 %s below the threshold (>= %.0f%% identical, |dBLEU-4| <= %.2f): %s; "
                        "--precision auto will not pick it", "encoder + step" if enc8 else "step",
                        INT8_MIN_IDENTICAL_PCT, INT8_MAX_BLEU4_DELTA, rec["why"])
        out[key] = rec
    return out
