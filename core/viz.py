"""Figures: learning curve, captioned image, attention maps (PNG files).

Headless and safe to call from threads, worker processes and training loops: every figure is a standalone
``matplotlib.figure.Figure`` drawn by its own ``FigureCanvasAgg``. pyplot is never imported, so the caller's
backend, current figure and rcParams are left untouched. Every file is written atomically (temporary file in
the target folder, fsync, ``os.replace``), so a reader never sees a half-written PNG.

    from core.viz import plot_learning_curve, save_captioned_image, save_attention_figure
    plot_learning_curve([{"epoch": 1, "train_loss": 3.1, "val_loss": 3.4, "bleu4": 0.08}, ...], "curve.png")
    save_captioned_image("dog.jpg", "a dog runs on the grass", "dog_captioned.png")
    save_attention_figure("dog.jpg", ["a", "dog", "runs", "<end>"], hyp.alphas, grid=14, path="dog_att.png")
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from core.fileio import atomic_write

__all__ = ["plot_learning_curve", "save_captioned_image", "save_attention_figure"]

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------- helpers
def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas; independent of any pyplot backend
    return fig


def _save_atomic(fig: Figure, path: PathLike, **savefig_kwargs: Any) -> Path:
    """Render ``fig`` to ``path`` through a temporary file in the same folder, then rename it into place."""
    fmt = Path(path).suffix[1:].lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))


def _load_rgb(image: Image.Image | PathLike | np.ndarray) -> Image.Image:
    """A PIL RGB image from a PIL image, a file path, or an HxW / HxWx3 uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    raise TypeError(f"image must be a PIL.Image, a path or a numpy array, got {type(image).__name__}")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy float32 from a numpy array, a list, or a torch tensor (any device/dtype; torch is not imported)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------------------- learning curve
def _history_columns(history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> dict[str, list]:
    """Columns from a list of per-epoch dicts or from a dict of equal-length lists."""
    if isinstance(history, Mapping):
        cols = {k: list(v) for k, v in history.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"history lists have different lengths: {lengths}")
        return cols
    rows = list(history)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"history[{i}] is a {type(row).__name__}, expected a dict")
    keys = {k for row in rows for k in row}
    return {k: [row.get(k) for row in rows] for k in keys}


def _points(xs: list, ys: list | None) -> tuple[list[float], list[float]]:
    """(x, y) pairs where y is present and finite (epochs without that measurement are skipped)."""
    if ys is None:
        return [], []
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(float(y))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_learning_curve(
    history: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]],
    path: PathLike,
    *,
    title: str = "Learning curve",
    eval_label: str | None = None,
    dpi: int = 100,
    step_losses: Sequence[Sequence[float]] | None = None,
) -> Path:
    """Save train and test/validation loss per epoch (and BLEU-4 on a right axis when present) as a PNG.

    ``history`` is a list of per-epoch dicts or a dict of lists with keys ``train_loss``, ``val_loss`` (or
    ``test_loss``), optional ``epoch`` (default 1..N) and optional ``bleu4``; ``None`` or NaN entries are
    skipped. The evaluation curve is labelled ``eval_label`` (default "validation loss" / "test loss" after
    the key). ``step_losses``: optional ``[epoch position, loss]`` pairs, one per optimizer step, drawn as a thin
    line under the per-epoch points. Returns the path written.
    """
    cols = _history_columns(history)
    n = max((len(v) for v in cols.values()), default=0)
    if n == 0:
        raise ValueError("history is empty: nothing to plot")
    if "train_loss" not in cols:
        raise ValueError(f"history has no 'train_loss' (keys: {sorted(cols)})")
    epochs = cols.get("epoch") or list(range(1, n + 1))
    if any(e is None for e in epochs):
        raise ValueError("history has an entry without 'epoch'")
    eval_key = "val_loss" if "val_loss" in cols else ("test_loss" if "test_loss" in cols else None)
    if eval_label is None:
        eval_label = {"val_loss": "validation loss", "test_loss": "test loss"}.get(eval_key or "", "")

    fig = _new_figure((7.0, 4.5), dpi)
    ax = fig.add_subplot(1, 1, 1)
    handles = []
    if step_losses:
        x, y = _points([s[0] for s in step_losses], [s[1] for s in step_losses])
        handles += ax.plot(x, y, linewidth=0.8, alpha=0.45, color="tab:blue", label="train loss (per step)")
    x, y = _points(epochs, cols["train_loss"])
    handles += ax.plot(x, y, marker="o", color="tab:blue", label="train loss")
    if eval_key:
        x, y = _points(epochs, cols[eval_key])
        handles += ax.plot(x, y, marker="s", color="tab:orange", label=eval_label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    x, y = _points(epochs, cols.get("bleu4"))
    if x:
        ax2 = ax.twinx()
        handles += ax2.plot(x, y, marker="^", linestyle="--", color="tab:green", label="BLEU-4")
        ax2.set_ylabel("BLEU-4")
    ax.legend(handles=handles, loc="best")
    ax.set_title(title)
    fig.tight_layout()
    return _save_atomic(fig, path)


# ------------------------------------------------------------------------------------------ captioned image
def save_captioned_image(
    image: Image.Image | PathLike | np.ndarray,
    caption: str,
    path: PathLike,
    *,
    width_in: float = 6.0,
    dpi: int = 100,
    wrap: int = 60,
) -> Path:
    """Save ``image`` with ``caption`` written underneath (wrapped at ``wrap`` characters). Returns the path."""
    img = _load_rgb(image)
    w, h = img.size
    lines = textwrap.wrap(caption, width=wrap) or [""]
    text_in = 0.3 * len(lines) + 0.2
    fig = _new_figure((width_in, width_in * h / w + text_in), dpi)
    img_frac = 1.0 - text_in / (width_in * h / w + text_in)
    ax = fig.add_axes((0.0, 1.0 - img_frac, 1.0, img_frac))
    ax.imshow(np.asarray(img))
    ax.set_axis_off()
    fig.text(0.5, (1.0 - img_frac) / 2, "\n".join(lines), ha="center", va="center", fontsize=12, wrap=False)
    return _save_atomic(fig, path)


# ------------------------------------------------------------------------------------------ attention figure
def save_attention_figure(
    image: Image.Image | PathLike | np.ndarray,
    words: Sequence[str],
    alphas: Any,
    grid: int,
    path: PathLike,
    *,
    size: int = 224,
    columns: int = 5,
    overlay_alpha: float = 0.7,
    cmap: str = "Greys_r",
    show_image: bool = True,
    panel_in: float = 2.4,
    dpi: int = 80,
) -> Path:
    """One panel per word: the attention map of that step upsampled smoothly over the image.

    ``alphas`` is ``[T, P]`` (torch tensor or array) with ``T == len(words)`` and ``P == grid * grid``; row t
    is the attention used to emit ``words[t]`` (pass ``"<end>"`` as the last word if the decoder's alphas
    include the end step). The image is resized to ``size x size`` as the encoder sees it; each map is
    resized bilinearly from ``grid x grid`` to the same size and drawn with ``cmap`` at ``overlay_alpha``.
    With ``show_image`` the first panel is the image alone ("input"). Every map shares one colour scale, from 0 to
    the largest weight, shown by a colour bar. Panels are laid out ``columns`` per row.
    """
    words = list(words)
    a = _to_numpy(alphas)
    _check_attention_args(words, a, grid, columns)
    img = np.asarray(_load_rgb(image).resize((size, size), Image.Resampling.BICUBIC))
    panels = len(words) + int(show_image)
    if panels == 0:
        raise ValueError("nothing to draw: no words and show_image=False")
    ncols = min(columns, panels)
    nrows = math.ceil(panels / ncols)
    fig = _new_figure((panel_in * ncols, panel_in * nrows + 0.1), dpi)

    fig.set_layout_engine("constrained")

    def panel(i: int, title: str):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img)
        ax.set_title(title, fontsize=11)
        ax.set_axis_off()
        return ax

    if show_image:
        panel(0, "input")
    # One scale for every word (0 to the largest weight), so that panels compare and the colour bar reads true.
    top = float(a.max()) if a.size else 1.0
    axes, shown = [], None
    for t, word in enumerate(words):
        ax = panel(t + int(show_image), word)
        amap = Image.fromarray(np.ascontiguousarray(a[t].reshape(grid, grid)))  # mode "F"
        amap = amap.resize((size, size), Image.Resampling.BILINEAR)
        shown = ax.imshow(np.asarray(amap), cmap=cmap, alpha=overlay_alpha, vmin=0.0, vmax=max(top, 1e-6),
                          extent=(-0.5, size - 0.5, size - 0.5, -0.5))
        axes.append(ax)
    if shown is not None:
        fig.colorbar(shown, ax=axes, shrink=0.8, label="attention weight")
    return _save_atomic(fig, path)


def _check_attention_args(words: list[str], a: np.ndarray, grid: Any, columns: int) -> None:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if a.ndim != 2:
        raise ValueError(f"alphas must be 2-D [T, P], got shape {tuple(a.shape)}")
    if a.shape[0] != len(words):
        raise ValueError(
            f"alphas has {a.shape[0]} rows but there are {len(words)} words; one attention row per word "
            "(add '<end>' to words if the alphas include the end step)"
        )
    if a.shape[1] != grid * grid:
        raise ValueError(f"alphas has P={a.shape[1]} positions but grid={grid} gives grid*grid={grid * grid}")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
