"""Evaluation during and after training: teacher-forced loss and beam-search BLEU/CIDEr over a split, on every rank.

``evaluate`` scores one split (each rank its share of the images; hypotheses gathered and scored on rank 0);
``validate`` is the per-epoch val pass, after precise BatchNorm statistics (``recompute_bn_stats``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from core.cocoeval import CocoEvalUnavailable
from core.data import CaptionTable
from core.evaluate import evaluate_captions
from core.fileio import atomic_write_text
from core.decode import beam_search
from core.metrics import caption_metrics
from core.model import CaptionModel, caption_loss
from core.vocab import Vocabulary
from distributed.config import TrainConfig
from distributed.env import DistEnv, all_gather_objects, all_reduce_mean, all_reduce_sum, broadcast_buffers, \
    broadcast_object
from distributed.loaders import EvalLoader, Loaders


@torch.no_grad()
def recompute_bn_stats(encoder: torch.nn.Module, batches, autocast) -> bool:
    """Precise BatchNorm: replace the running averages by the statistics of ``batches`` (train mode, no update).

    BatchNorm's running averages lag behind weights that change fast (a from-scratch encoder early in training),
    and evaluating with them can wreck the model's output. Averaged over ranks. Returns False if there was nothing
    to recompute (no BatchNorm or no batch).
    """
    bns = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    batches = iter(batches)
    first = next(batches, None)
    if not bns or first is None:
        return False
    momenta, was_training = [bn.momentum for bn in bns], encoder.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    encoder.train()
    for batch in itertools.chain([first], batches):
        with autocast:
            encoder(batch.images)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.running_mean.copy_(all_reduce_mean(bn.running_mean))
        bn.running_var.copy_(all_reduce_mean(bn.running_var))
    encoder.train(was_training)
    return True


@torch.no_grad()
def _score_batch(model: CaptionModel, images, caps, lens, vocab: Vocabulary, autocast, cfg: TrainConfig,
                 beam_size: int):
    """Teacher-forced loss over every reference caption of the batch, and beam-search hypotheses."""
    with autocast:
        enc = model.encoder(images).flatten(1, 2)  # (B, P, C)
        k = caps.shape[1]
        rows = lens.reshape(-1) > 0
        dev = enc.device
        lens_r = lens.reshape(-1)[rows].to(dev)
        caps_r = caps.reshape(-1, caps.shape[-1])[rows][:, : int(lens_r.max())].to(dev)
        logits, alphas = model.decoder(enc.repeat_interleave(k, 0)[rows.to(dev)], caps_r, lens_r)
        loss = caption_loss(logits, caps_r, lens_r, alphas, cfg.alpha_c)
        found = beam_search(model.decoder.encode_features(enc), model.step, beam_size, cfg.max_decode_len,
                            vocab.start_id, vocab.end_id)
    return float(loss), len(lens_r), found


@torch.no_grad()
def evaluate(model: CaptionModel, loader: EvalLoader, table: CaptionTable, vocab: Vocabulary, autocast,
             cfg: TrainConfig, env: DistEnv, beam_size: int) -> dict[str, Any]:
    """Teacher-forced loss over all reference captions and beam-search BLEU-1..4 / CIDEr on one split.

    Each rank scores its share of the images; duplicates (padding) are dropped by image index; hypotheses are
    gathered and scored on rank 0 and the scores are broadcast, so every rank returns the same dict. The
    hypotheses (``{index: tokens}``) are returned on rank 0 only.
    """
    model.eval()
    hyps: dict[int, list[int]] = {}
    totals = torch.zeros(2, dtype=torch.float64)  # loss x captions, captions
    for batch in loader:
        keep = torch.tensor([int(i) not in hyps for i in batch.indices])
        if not keep.any():
            continue
        idx = batch.indices[keep]
        images = batch.images[keep.to(batch.images.device)]
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss, n, found = _score_batch(model, images, table.tokens[idx], table.lengths[idx], vocab, autocast, cfg,
                                      beam_size)
        totals += torch.tensor([loss * n, n], dtype=torch.float64)
        for i, h in zip(idx.tolist(), found):
            hyps[i] = h.tokens
    totals = all_reduce_sum(totals.to(env.device)).cpu()
    merged: dict[int, list[int]] = {}
    for part in all_gather_objects(hyps):
        merged.update(part)
    metrics = None
    if env.is_main:
        order = sorted(merged)
        metrics = caption_metrics([vocab.decode_tokens(merged[i]) for i in order],
                                  [table.references(i) for i in order]) if order else \
            {k: float("nan") for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider")}
        metrics["images"] = len(order)
    metrics = broadcast_object(metrics)
    metrics["loss"] = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    metrics["hypotheses"] = merged if env.is_main else {}
    return metrics


def validate(model: CaptionModel, autocast, loaders: Loaders, vocab: Vocabulary, cfg: TrainConfig, env: DistEnv,
             epoch: int) -> dict[str, Any]:
    """Val metrics with precise BatchNorm statistics (else rank 0's), leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[env.local_rank] if env.device.type == "cuda" else []):
        # (a run stopped and resumed here stays bit-identical)
        batches = itertools.islice(loaders.bn.epoch(epoch), cfg.precise_bn) if loaders.bn is not None else ()
        if not recompute_bn_stats(model.encoder, batches, autocast):
            broadcast_buffers(model)
        if loaders.bn is not None:
            loaders.bn.close()
        return evaluate(model, loaders.val, loaders.val_table, vocab, autocast, cfg, env, cfg.val_beam_size)


def coco_results(hypotheses: dict[int, list[int]], names: list[str], vocab: Vocabulary) -> list[dict]:
    """COCO-format results ``[{"image_id": name, "caption": ...}]`` of the hypotheses (``{table index: ids}``)."""
    return [{"image_id": names[i], "caption": vocab.decode(hypotheses[i])} for i in sorted(hypotheses)]


def coco_test_metrics(results: list[dict], references: dict[str, list[str]], out: Path, coco: bool) -> dict[str, Any]:
    """Rank 0 at the end of training: ``out/test_results.json``, then its COCO caption metrics (core.cocoeval).

    Returns ``{"coco": {...scores, unavailable, tokenizer}}``, or the reason they were not computed.
    """
    path = out / "test_results.json"
    atomic_write_text(path, json.dumps(results, indent=0) + "\n")
    if not coco:
        return {"coco_skipped": f"--no-coco-eval (score it with: python -m core.evaluate {path} --data DATA "
                                f"--split test)"}
    try:
        scores = evaluate_captions({r["image_id"]: r["caption"] for r in results}, references)
    except CocoEvalUnavailable as e:
        return {"coco_skipped": str(e)}
    return {"coco": scores.to_dict()}
