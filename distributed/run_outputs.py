"""What a training run writes for people: metrics.csv, the learning curve, captioned examples, one-line summaries.

Called by ``distributed/train.py`` on rank 0; everything goes through ``core.fileio``'s atomic writes, so a run
killed mid-write leaves the previous file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from core.data import CaptionDataset
from core.decode import beam_search
from core.fileio import atomic_write, atomic_write_text
from core.model import CaptionModel
from core.vocab import Vocabulary

CSV_COLUMNS = ["epoch", "step", "train_loss", "val_loss", "bleu1", "bleu2", "bleu3", "bleu4", "cider", "lr",
               "samples_per_s", "elapsed"]
METRIC_FLOOR = 1e-9  # corpus BLEU of an untrained model is ~1e-232 (no 4-gram match): written as 0


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "0" if 0 < abs(value) < METRIC_FLOOR else f"{value:.6g}"
    return value


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per evaluation (columns CSV_COLUMNS), rewritten whole and atomically."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: _cell(v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def fmt_metrics(m: dict) -> str:
    return (f"loss {m['loss']:.3f} | BLEU-1..4 {m['bleu1']:.3f} {m['bleu2']:.3f} {m['bleu3']:.3f} "
            f"{m['bleu4']:.3f} | CIDEr {m['cider']:.3f}")


def fmt_coco(test: dict) -> str:
    """The COCO caption metrics of a test report (``coco_test_metrics``), one line, or why they are missing."""
    from core.cocoeval import CocoScores

    coco = test.get("coco")
    if not coco:
        return f"COCO caption metrics not computed: {test.get('coco_skipped', 'no test split')}"
    return "test, " + CocoScores.from_dict(coco).line()


def write_examples(model: CaptionModel, data: CaptionDataset, vocab: Vocabulary, names: list[str], beam_size: int,
                   max_len: int, autocast, out: Path) -> list[dict]:
    """Caption ``names`` with beam search; save captioned images, attention figures and captions.json."""
    from core.viz import save_attention_figure, save_captioned_image

    if not names:
        return []
    cfg = model.cfg
    device = next(model.parameters()).device
    images = data.eval_images(names, cfg.image_size).to(device)  # (N, 3, S, S)
    model.eval()
    with torch.no_grad(), autocast:
        found = beam_search(model.encode(images), model.step, beam_size, max_len, vocab.start_id, vocab.end_id)
    rows = []
    for name, hyp in zip(names, found):
        words = [vocab.itos[t] for t in hyp.tokens]
        stem = Path(name).stem
        save_captioned_image(data.image_path(name), " ".join(words), out / f"{stem}_caption.png")
        if words:
            save_attention_figure(data.image_path(name), words, hyp.alphas, grid=cfg.encoded_size,
                                  path=out / f"{stem}_attention.png", size=max(cfg.image_size, 96))
        rows.append({"image": name, "caption": " ".join(words), "references": data.captions[name]})
    atomic_write_text(out / "captions.json", json.dumps(rows, indent=1) + "\n")
    return rows


def write_learning_curve(history: list[dict], path: Path, title: str, step_losses: list | None = None) -> None:
    """Per-evaluation losses and BLEU-4, and (``step_losses``: [epoch position, loss] rows) the loss of every step."""
    if history:
        from core.viz import plot_learning_curve

        plot_learning_curve(history, path, title=title, step_losses=step_losses)
