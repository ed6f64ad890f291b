"""The frozen encoder's output, computed once per image and memory-mapped: what training reads instead of JPEGs.

    python distributed/train.py --data Flickr8k --feature-cache auto      # (encoder frozen: the default)

While the encoder is frozen its output for an image never changes, yet the image path decodes the JPEG and runs
the CNN for it in every epoch (most of a step's time with ResNet-101). ``--feature-cache DIR`` runs it once per
training image instead (every rank its shard, in parallel), stores the features ``(N, P, C)`` in one
memory-mapped ``.npy`` file (fp16 by default: half of fp32's disk), and trains the decoder from them
(``distributed/loaders.py:FeatureTrainLoader``). The features are those of the eval transform: a cached image has
one crop, so random crops and flips are off (training says so). Validation still runs the full model on images.

Layout: ``DIR/<key>/features.npy`` + ``names.json`` + ``complete.json``. ``key`` hashes everything the features
depend on: the encoder's weights and buffers, the preprocessing (backbone, image size, grid, transform, the
autocast dtype), the stored dtype, and the image files (names, sizes, modification times). A run whose key
exists reuses the cache (across epochs and runs); a change of any of them builds a new one beside it.

A crash mid-build leaves nothing a later run would trust: the build writes ``DIR/<key>.partial/``, and only a
complete build gets its ``complete.json`` (holding the key) and is renamed to ``DIR/<key>``; the next build in DIR
removes every partial folder (so one build at a time per DIR). The disk space is checked first: ResNet-101 at 256 px gives 196 x 2048 values per image,
about 0.8 MB in 16 bits (4.7 GB for Flickr8k's 6,000 training images, 90 GB for COCO's 113,287).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from core.data import CaptionDataset, EvalDataset
from core.fileio import atomic_write_text
from core.images import IMAGENET_MEAN, IMAGENET_STD, image_transform
from core.model import CaptionModel
from distributed.env import DistEnv, all_reduce_sum, barrier, print0

CACHE_VERSION = 1
FP16_MAX = 65504.0
# stored dtype -> (numpy dtype of the file, torch dtype the stored bits are read as)
STORED = {"fp16": (np.float16, torch.float16), "bf16": (np.int16, torch.bfloat16), "fp32": (np.float32, torch.float32)}


class FeatureCacheError(RuntimeError):
    """The cache cannot be built or used (no disk space, values out of range): the message says what to do."""


@dataclass
class FeatureCache:
    """Row i = the features of image ``names[i]``; ``rows(indices)`` -> float32 (B, P, C)."""

    path: Path
    names: list[str]
    features: np.ndarray  # (N, P, C) memory-mapped, read-only
    dtype: str

    def rows(self, indices: Sequence[int]) -> Tensor:
        block = np.ascontiguousarray(self.features[np.asarray(indices, dtype=np.int64)])  # (B, P, C): reads them
        return torch.from_numpy(block).view(STORED[self.dtype][1]).float()


# ------------------------------------------------------------------------------------------------------ the key
def encoder_digest(model: CaptionModel) -> str:
    """sha256 of the encoder's weights and buffers (BatchNorm statistics change its output too)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_digest(paths: Sequence[Path]) -> str:
    """sha256 of the image files' names, sizes and modification times (reading 13 GB of COCO would cost minutes)."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_key(model: CaptionModel, paths: Sequence[Path], dtype: str, amp: str) -> tuple[str, dict[str, Any]]:
    """(key, what it hashes): equal keys mean identical features."""
    cfg = model.cfg
    what = {
        "version": CACHE_VERSION, "encoder_sha256": encoder_digest(model), "files_sha256": files_digest(paths),
        "images": len(paths), "backbone": cfg.backbone, "image_size": cfg.image_size,
        "encoded_size": cfg.encoded_size, "transform": repr(image_transform(cfg.image_size, train=False)),
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "autocast": amp, "stored": dtype,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20], what


# ----------------------------------------------------------------------------------------------------- the place
def resolve_dir(setting: str, data_root: str | Path) -> Path:
    """--feature-cache: a DIR as given; auto: DATA/.feature_cache where DATA is writable, else ~/.cache/sat/features."""
    if setting != "auto":
        return Path(setting)
    root = Path(data_root)
    if os.access(root, os.W_OK):
        return root / ".feature_cache"
    return Path.home() / ".cache" / "sat" / "features" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def bytes_needed(n_images: int, num_pixels: int, channels: int, dtype: str) -> int:
    return n_images * num_pixels * channels * np.dtype(STORED[dtype][0]).itemsize


def check_disk_space(folder: Path, needed: int, margin: int = 256 << 20) -> None:
    """Refuse, with the figures, a cache that would not fit (plus a margin left for everything else)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed + margin > free:
        raise FeatureCacheError(
            f"the feature cache needs {needed / 1e9:.2f} GB in {folder} but only {free / 1e9:.2f} GB are free: "
            f"free some space, give --feature-cache another DIR, or --feature-cache none (the encoder then runs "
            f"on every image in every epoch)")


def _complete(path: Path, key: str) -> bool:
    try:
        return json.loads((path / "complete.json").read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def _open(path: Path, dtype: str) -> FeatureCache:
    names = json.loads((path / "names.json").read_text())
    return FeatureCache(path, names, np.load(path / "features.npy", mmap_mode="r"), dtype)


# ----------------------------------------------------------------------------------------------------- building
@torch.no_grad()
def _write_shard(model: CaptionModel, dataset: EvalDataset, rows: list[int], out: np.ndarray, dtype: str,
                 autocast, batch_size: int, workers: int) -> None:
    """Encode images ``rows`` of ``dataset`` and write their features into ``out`` (N, P, C) at those rows."""
    device = next(model.parameters()).device
    channels_last = next(model.encoder.parameters()).is_contiguous(memory_format=torch.channels_last)
    # Its own generator: building must not consume the global RNG (the run's dropout masks stay those of a run
    # from images, step for step).
    loader = DataLoader(dataset, batch_size=batch_size, sampler=rows, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    model.encoder.eval()
    for images, idx in loader:
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            feats = model.encoder(images).flatten(1, 2).float()  # (B, P, C)
        peak = float(feats.abs().max())
        if dtype == "fp16" and not peak <= FP16_MAX:
            raise FeatureCacheError(f"encoder outputs reach {peak:.3g}, beyond fp16's range (65504): use "
                                    f"--feature-cache-dtype bf16 (or fp32)")
        stored = feats.to(STORED[dtype][1]).cpu()
        out[idx.numpy()] = (stored.view(torch.int16) if dtype == "bf16" else stored).numpy()


def _build(model, data: CaptionDataset, names: list[str], final: Path, key: str, what: dict, dtype: str, autocast,
           env: DistEnv, batch_size: int, workers: int) -> None:
    partial = final.with_name(final.name + ".partial")
    cfg = model.cfg
    shape = (len(names), cfg.num_pixels, cfg.encoder_dim)
    check_disk_space(final.parent, bytes_needed(*shape, dtype))  # every rank: all refuse together
    if env.is_main:
        for stale in final.parent.glob("*.partial"):  # what crashed builds left (any key): never trusted, removed
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir(parents=True)
        np.lib.format.open_memmap(partial / "features.npy", mode="w+", dtype=STORED[dtype][0], shape=shape).flush()
    barrier()
    t0 = time.perf_counter()
    out = np.load(partial / "features.npy", mmap_mode="r+")
    dataset = EvalDataset(data.images_dir, names, image_transform(cfg.image_size, train=False))
    error: Exception | None = None
    try:
        _write_shard(model, dataset, list(range(env.rank, len(names), env.world_size)), out, dtype, autocast,
                     batch_size, workers)
        out.flush()
    except Exception as e:  # (an unreadable image, out of range): every rank must stop, not wait at the barrier
        error = e
    del out
    if float(all_reduce_sum(torch.tensor([float(error is not None)], device=env.device))[0]) > 0:
        raise error or FeatureCacheError("another process failed to build its part of the feature cache")
    if env.is_main:
        atomic_write_text(partial / "names.json", json.dumps(names) + "\n")
        atomic_write_text(partial / "complete.json", json.dumps({"key": key, **what}, indent=1) + "\n")
        os.replace(partial, final)  # the one step that makes the cache visible, after everything is on disk
    barrier()
    print0(env, f"feature cache built in {time.perf_counter() - t0:.1f}s: {len(names)} images, "
                f"{bytes_needed(*shape, dtype) / 1e9:.2f} GB ({dtype}) in {final}")


def open_feature_cache(model: CaptionModel, data: CaptionDataset, split: str, setting: str, dtype: str, amp: str,
                       autocast, env: DistEnv, batch_size: int = 32, workers: int = 0) -> FeatureCache:
    """The cache of ``split``'s images for this encoder: reused when its key exists, else built (all ranks)."""
    names = list(data.splits[split])
    key, what = cache_key(model, [data.image_path(n) for n in names], dtype, amp)
    final = resolve_dir(setting, data.root) / key
    # Every rank looks; one that does not see a complete cache (another filesystem?) makes all of them build it.
    missing = all_reduce_sum(torch.tensor([0.0 if _complete(final, key) else 1.0], device=env.device))
    if float(missing[0]) > 0:
        print0(env, f"feature cache: building {final} (encoder {what['encoder_sha256'][:12]}, "
                    f"{len(names)} {split} images)")
        _build(model, data, names, final, key, what, dtype, autocast, env, batch_size, workers)
    else:
        print0(env, f"feature cache: reusing {final}")
    cache = _open(final, dtype)
    if cache.names != names:
        raise FeatureCacheError(f"{final}/names.json does not list this run's {split} images: delete {final}")
    return cache
