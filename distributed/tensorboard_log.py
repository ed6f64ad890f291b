"""TensorBoard event files of a training run (rank 0 only): ``tensorboard --logdir runs/``.

Written to ``--out/tensorboard/`` (``--no-tensorboard``: nothing):

- per optimizer step: ``train/loss`` (mean over ranks), ``train/lr``, ``train/grad_norm`` (global L2 norm of the
  gradients before clipping), ``train/captions_per_s``, ``train/data_wait_share`` (share of the step waiting for
  the loader);
- per evaluation: ``val/loss``, ``val/bleu1..4``, ``val/cider`` and ``attention/<image>``: attention figures of
  a few val images (``--num-examples``, at most 2: each image lit by each word's attention, and the caption as
  text), so the attention can be watched as it forms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SCALARS_DIR = "tensorboard"
FIGURES_PER_EPOCH = 2
WORDS_PER_FIGURE = 8


def attention_strip(path: Path, alphas: torch.Tensor, grid: int, size: int) -> np.ndarray:
    """The image, then one panel per word: the image lit by that word's attention (T, P) -> uint8 (S, S x (T+1), 3).

    Drawn with PIL, not matplotlib: a figure per epoch must cost milliseconds, not seconds."""
    from PIL import Image

    from core.images import load_image

    img = np.asarray(load_image(path).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)  # (S, S, 3)
    a = alphas.detach().float().cpu().numpy()  # (T, P)
    top = max(float(a.max()), 1e-6) if a.size else 1.0
    panels = [img]
    for row in a:
        amap = Image.fromarray(np.ascontiguousarray(row.reshape(grid, grid) / top)).resize((size, size),
                                                                                            Image.Resampling.BILINEAR)
        panels.append(img * (0.25 + 0.75 * np.asarray(amap)[..., None]))
    return np.concatenate(panels, axis=1).clip(0, 255).astype(np.uint8)


class TensorBoardLog:
    """A no-op unless ``enabled`` (rank 0 with --tensorboard). ``examples``: (dataset, vocabulary, val image names,
    beam size, max length) of the attention figures."""

    def __init__(self, out: Path, enabled: bool, examples: tuple | None = None) -> None:
        self.writer = None
        self.examples = examples
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out) / SCALARS_DIR))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def grad_norm(self, optimizer: torch.optim.Optimizer, scale: float) -> float:
        """L2 norm of every gradient (scale: the GradScaler's, 1.0 unless fp16), before clipping."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())) / scale

    def step(self, step: int, loss: float, lr: float, grad_norm: float, captions_per_s: float,
             data_share: float) -> None:
        if self.writer is None:
            return
        for name, value in (("loss", loss), ("lr", lr), ("grad_norm", grad_norm), ("captions_per_s", captions_per_s),
                            ("data_wait_share", data_share)):
            self.writer.add_scalar(f"train/{name}", value, step)

    def evaluation(self, step: int, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("loss", "bleu1", "bleu2", "bleu3", "bleu4", "cider"):
            if key in metrics:
                self.writer.add_scalar(f"val/{key}", float(metrics[key]), step)
        self.writer.flush()

    def attention(self, step: int, model, autocast) -> None:
        """Attention strips of the first FIGURES_PER_EPOCH example images (and their captions) at ``step``."""
        if self.writer is None or not self.examples or not self.examples[2]:
            return
        from core.decode import beam_search

        data, vocab, names, beam_size, max_len = self.examples
        names = names[:FIGURES_PER_EPOCH]
        was_training = model.training
        model.eval()
        images = data.eval_images(names, model.cfg.image_size).to(next(model.parameters()).device)  # (N, 3, S, S)
        with torch.no_grad(), autocast:
            found = beam_search(model.encode(images), model.step, beam_size, max_len, vocab.start_id, vocab.end_id)
        model.train(was_training)
        for name, hyp in zip(names, found):
            words = [vocab.itos[t] for t in hyp.tokens][:WORDS_PER_FIGURE]
            strip = attention_strip(data.image_path(name), hyp.alphas[: len(words)], model.cfg.encoded_size,
                                    max(model.cfg.image_size, 96))
            self.writer.add_image(f"attention/{Path(name).stem}", strip, step, dataformats="HWC")
            self.writer.add_text(f"attention/{Path(name).stem}", " ".join(words) or "(empty)", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
