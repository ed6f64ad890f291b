"""Two loaders, one batch format: ``Batch(images [B,3,S,S] float32 normalized, captions [B,T] int64, lengths [B],
indices [B])`` with the images on the training device.

- ``torch``: ``DataLoader`` over ``core.data`` datasets (PIL decode + ``core.images.ImageTransform``) with a
  ``DistributedSampler``; workers, pinned memory on GPU.
- ``dali``: ``distributed/dali_pipeline.py`` (JPEG decode on the GPU with one, else on the CPU), same transform rule.
- ``FeatureTrainLoader``: a frozen encoder's cached outputs (``distributed/feature_cache.py``) in place of images.

Sampling is the same for both. Training: ``DistributedSampler(shuffle=True, seed)`` with ``set_epoch(epoch)``, so
the order of an epoch depends only on (seed, epoch); it pads every rank to the same number of samples, so every
rank runs the same number of steps (a DDP requirement). ``epoch(e, start_batch=b)`` starts an epoch at batch
``b``: a run resumed mid-epoch sees exactly the batches it had not trained on. (For DALI this is why each rank
hands its reader its own file list for the epoch instead of letting the reader shuffle: the reader's shuffle
cannot be positioned.) Evaluation: every image exactly once over all ranks, no padding; the indices let the
caller gather and deduplicate anyway.

Captions are attached by index with ``CaptionTable.sample(indices, epoch, seed)``: one of the image's captions
per epoch, the same choice on every rank and in both loaders.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from core.data import CaptionDataset, CaptionTable, EvalDataset, TrainDataset, apply_skip_list, load_dataset
from core.hardware import cpu_cores
from core.images import image_transform
from core.skiplist import SKIP_LIST_NAME, read_skip_list
from core.vocab import Vocabulary
from distributed.config import TrainConfig
from distributed.env import DistEnv, print0, warn0


class Batch(NamedTuple):
    images: Tensor  # (B, 3, S, S) float32, ImageNet-normalized, on the device
    captions: Tensor  # (B, T) int64, <start> ... <end> <pad>...
    lengths: Tensor  # (B,) int64, tokens incl. <start> and <end>
    indices: Tensor  # (B,) int64 rows of the CaptionTable (CPU)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing CUDA libs, ...)
        return False
    return True


def resolve_loader(name: str) -> str:
    if name == "auto":
        return "dali" if dali_available() else "torch"
    if name == "dali" and not dali_available():
        raise RuntimeError("--loader dali: nvidia.dali does not import here; use --loader torch "
                           "(or pip install nvidia-dali-cuda130)")
    return name


def train_indices(n: int, env: DistEnv, epoch: int, seed: int) -> list[int]:
    """This rank's sample indices for ``epoch`` (DistributedSampler order: padded, same length on every rank)."""
    sampler = DistributedSampler(range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def eval_shard(n: int, env: DistEnv) -> list[int]:
    """This rank's share of ``range(n)`` for evaluation: strided, no padding (ranks may differ by one)."""
    return list(range(env.rank, n, env.world_size))


class _ListSampler(Sampler[int]):
    """Yields ``indices``, which the loader replaces before every epoch (works with persistent workers)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.indices))

    def __len__(self) -> int:
        return len(self.indices)


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device, non_blocking=True) if x.device != device else x


class TrainLoader:
    """``epoch(e, start_batch)`` -> iterator of :class:`Batch`; ``num_batches`` per epoch (same on every rank)."""

    def __init__(self, data: CaptionDataset, table: CaptionTable, image_size: int, batch_size: int, env: DistEnv,
                 seed: int, workers: int, hflip: bool = False, split: str = "train", random_crop: bool = True,
                 channels_last: bool = False, captions_per_image: int = 1) -> None:
        self.names = data.splits[split]
        self.images_dir = data.images_dir
        self.paths = [str(data.image_path(n)) for n in self.names]
        self.table, self.image_size, self.batch_size = table, image_size, batch_size
        self.env, self.seed, self.workers, self.hflip = env, seed, workers, hflip
        self.random_crop, self.channels_last = random_crop, channels_last
        self.captions_per_image = captions_per_image
        self.samples_per_rank = math.ceil(len(self.names) / env.world_size)

    @property
    def num_batches(self) -> int:
        return math.ceil(self.samples_per_rank / self.batch_size)

    def _indices(self, epoch: int, start_batch: int) -> list[int]:
        return train_indices(len(self.names), self.env, epoch, self.seed)[start_batch * self.batch_size:]

    def _batch(self, images: Tensor, indices: Tensor, epoch: int) -> Batch:
        captions, lengths = self.table.sample(indices, epoch=epoch, seed=self.seed, k=self.captions_per_image)
        dev = self.env.device
        images = _to_device(images, dev)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return Batch(images, _to_device(captions, dev), _to_device(lengths, dev), indices.cpu())

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchTrainLoader(TrainLoader):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler = _ListSampler()
        dataset = TrainDataset(self.images_dir, self.names,
                               image_transform(self.image_size, train=self.random_crop, hflip=self.hflip))
        self.loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=self.workers > 0,
            # Its own generator: creating an iterator must not consume the global RNG (bit-exact resume).
            generator=torch.Generator().manual_seed(self.seed + 1000 * self.env.rank),
            prefetch_factor=4 if self.workers > 0 else None,
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        self.sampler.indices = self._indices(epoch, start_batch)
        for images, indices in self.loader:
            yield self._batch(images, indices, epoch)


class DaliTrainLoader(TrainLoader):
    """A pipeline per epoch over this rank's files for that epoch, in the sampler's order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads = max(1, self.workers)
        self._iterator = None

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        from distributed.dali_pipeline import build_iterator

        indices = self._indices(epoch, start_batch)
        if not indices:
            return
        self.close()
        # The augmentation seed depends on where the pass starts, so a resumed epoch is reproducible too.
        seed = (self.seed * 1_000_003 + epoch * 10_007 + self.env.rank * 101 + start_batch) % (2**31 - 1)
        device_id = self.env.local_rank if self.env.device.type == "cuda" else None
        self._iterator = build_iterator([self.paths[i] for i in indices], indices, self.image_size, self.random_crop,
                                        self.batch_size, self.threads, device_id, seed, hflip=self.hflip)
        for out in self._iterator:
            images, labels = out[0]["images"], out[0]["labels"].reshape(-1).to(torch.int64)
            yield self._batch(images, labels.cpu(), epoch)
        self.close()

    def close(self) -> None:
        self._iterator = None  # releases the pipeline and its threads


class FeatureTrainLoader(TrainLoader):
    """A frozen encoder's cached outputs instead of images (``distributed/feature_cache.py``): ``Batch.images`` holds
    features (B, P, C) float32, in the same sampling order as the image loaders (row i of the cache = image i)."""

    def __init__(self, cache, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if cache.names != self.names:
            raise ValueError("the feature cache's images are not this split's")
        self.cache = cache
        self.channels_last = False  # features are not images

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        indices = self._indices(epoch, start_batch)
        for i in range(0, len(indices), self.batch_size):
            rows = torch.tensor(indices[i : i + self.batch_size], dtype=torch.int64)
            yield self._batch(self.cache.rows(rows), rows, epoch)  # (B, P, C)


class EvalLoader:
    """This rank's share of a split's images, each once: iterate for :class:`Batch` es (captions: slot of epoch 0)."""

    def __init__(self, data: CaptionDataset, table: CaptionTable, image_size: int, batch_size: int, env: DistEnv,
                 kind: str, workers: int, split: str = "val", max_images: int = 0) -> None:
        names = data.splits[split]
        self.n = min(len(names), max_images) if max_images > 0 else len(names)
        self.names = names[: self.n]
        self.images_dir = data.images_dir
        self.paths = [str(data.image_path(n)) for n in self.names]
        self.table, self.image_size, self.batch_size, self.env = table, image_size, batch_size, env
        self.kind, self.workers = kind, workers
        self._dali = None
        self._torch = None

    def _dali_iterator(self):
        """Files in index order, sharded by DALI (shard_id=rank); empty shards when there are fewer images than ranks."""
        from distributed.dali_pipeline import build_iterator

        shards = min(self.env.world_size, self.n)
        if self.env.rank >= shards:
            return None
        if self._dali is None:
            device_id = self.env.local_rank if self.env.device.type == "cuda" else None
            self._dali = build_iterator(self.paths, list(range(self.n)), self.image_size, False, self.batch_size,
                                        max(1, self.workers), device_id, seed=0, shard_id=self.env.rank,
                                        num_shards=shards)
        return self._dali

    def _torch_loader(self) -> DataLoader:
        if self._torch is None:
            dataset = EvalDataset(self.images_dir, self.names, image_transform(self.image_size, train=False))
            self._torch = DataLoader(
                dataset,
                batch_size=self.batch_size,
                sampler=eval_shard(self.n, self.env),
                num_workers=self.workers,
                pin_memory=self.env.device.type == "cuda",
                generator=torch.Generator().manual_seed(0),
            )
        return self._torch

    def __iter__(self) -> Iterator[Batch]:
        dev = self.env.device
        if self.kind == "dali":
            it = self._dali_iterator()
            if it is None:
                return
            try:
                for out in it:
                    images, idx = out[0]["images"], out[0]["labels"].reshape(-1).to(torch.int64).cpu()
                    if len(idx) == 0:  # a shorter shard runs as many iterations as the longest, padded: skip
                        continue
                    captions, lengths = self.table.sample(idx, epoch=0, seed=0)
                    yield Batch(_to_device(images, dev), captions.to(dev), lengths.to(dev), idx)
            finally:
                try:
                    it.reset()  # ready for the next pass (the next epoch's evaluation)
                except Exception:  # a pass cut short cannot be reset: build a new pipeline next time
                    self._dali = None
        else:
            for images, idx in self._torch_loader():
                captions, lengths = self.table.sample(idx, epoch=0, seed=0)
                yield Batch(_to_device(images, dev), captions.to(dev), lengths.to(dev), idx)

    def close(self) -> None:
        self._dali = None
        self._torch = None


def make_train_loader(kind: str, data: CaptionDataset, table: CaptionTable, image_size: int, batch_size: int,
                      env: DistEnv, seed: int, workers: int, hflip: bool = False, random_crop: bool = True,
                      channels_last: bool = False, captions_per_image: int = 1) -> TrainLoader:
    """``random_crop=False`` trains on the eval transform (resize only); ``channels_last`` converts the images."""
    cls = {"torch": TorchTrainLoader, "dali": DaliTrainLoader}[kind]
    return cls(data, table, image_size, batch_size, env, seed, workers, hflip, random_crop=random_crop,
               channels_last=channels_last, captions_per_image=captions_per_image)


def default_workers(kind: str, env: DistEnv, requested: int, deterministic: bool = False) -> int:
    """DataLoader workers (torch) or pipeline threads (DALI) per process when ``requested`` is -1."""
    if deterministic and kind == "torch":
        return 0
    if requested >= 0:
        return requested
    per_proc = max(1, cpu_cores() // env.local_world_size)
    if kind == "dali":
        return per_proc
    # On a small CPU machine the training step owns the cores; loading in the main process costs a few %.
    if env.device.type == "cpu":
        return 0 if per_proc <= 2 else min(4, per_proc - 1)
    return min(8, per_proc)


@dataclass
class Loaders:
    """Everything a training run reads: train batches, val images, and a second train stream for BatchNorm."""

    train: Any
    val: EvalLoader
    val_table: CaptionTable
    bn: Any  # a second train loader for precise BatchNorm statistics, or None
    kind: str  # "dali" or "torch" (the images'; "features" when the train loader reads the feature cache)
    workers: int
    captions_per_image: int = 1  # captions decoded per image per step (resolved from --captions-per-image)

    def close(self) -> None:
        self.train.close()
        self.val.close()


def resolve_captions_per_image(cfg: TrainConfig, table: CaptionTable) -> int:
    """--captions-per-image 0: all of an image's captions when the encoder is frozen (the encoder pass, or the
    cache read, then serves them all), one when it trains (the tutorial's)."""
    if cfg.captions_per_image:
        return cfg.captions_per_image
    return 1 if cfg.train_encoder else int(table.counts.max())


def build_loaders(cfg: TrainConfig, data: CaptionDataset, vocab: Vocabulary, env: DistEnv,
                  cache: Any = None) -> Loaders:
    """``cache``: a ``feature_cache.FeatureCache`` of the train split; the train loader then reads features."""
    kind = resolve_loader(cfg.loader)
    workers = default_workers(kind, env, cfg.workers, cfg.deterministic)
    train_table = data.caption_table("train", vocab, max_len=cfg.max_caption_len)
    val_table = data.caption_table("val", vocab, max_len=cfg.max_caption_len)
    common = (data, train_table, cfg.model.image_size, cfg.batch_size, env)
    k = resolve_captions_per_image(cfg, train_table)
    if cache is not None:
        train = FeatureTrainLoader(cache, *common, cfg.seed, workers, captions_per_image=k)
    else:
        train = make_train_loader(kind, *common, cfg.seed, workers, cfg.hflip, cfg.random_crop, cfg.channels_last, k)
    val = EvalLoader(data, val_table, cfg.model.image_size, cfg.eval_batch_size, env, kind, workers, "val",
                     cfg.val_max_images)
    bn = make_train_loader(kind, *common, cfg.seed + 1, 0 if kind == "torch" else workers, cfg.hflip,
                           cfg.random_crop, cfg.channels_last) if cfg.precise_bn and cfg.train_encoder else None
    return Loaders(train=train, val=val, val_table=val_table, bn=bn, kind=kind, workers=workers, captions_per_image=k)


def load_data(cfg: TrainConfig, env: DistEnv | None = None) -> tuple[CaptionDataset, Vocabulary]:
    """The dataset (skip list applied) and its vocabulary; what the loader skips by itself (caption lines that
    are duplicates or have no words, captioned images missing from the folder) is counted in the log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(cfg.data, karpathy_json=cfg.karpathy_json, seed=cfg.split_seed, val_frac=cfg.val_frac,
                             test_frac=cfg.test_frac, dataset=cfg.dataset)
    for w in caught:
        if env is not None:
            warn0(env, str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    # DALI cannot skip a sample at run time, and ranks that skip differently hang DDP: bad images are left out
    # here, by the same file on every rank, after the split so that every other image keeps its split.
    skip_path = Path(cfg.data) / SKIP_LIST_NAME if cfg.skip_list == "auto" else Path(cfg.skip_list)
    if cfg.skip_list != "none" and (cfg.skip_list != "auto" or skip_path.is_file()):
        skip = read_skip_list(skip_path, root=cfg.data)
        data = apply_skip_list(data, skip)
        if env is not None:
            print0(env, f"skipping {len(skip.skip)} image(s) listed in {skip_path}")
    # Deterministic (sorted by frequency, then alphabetically): every rank builds the same vocabulary.
    return data, data.build_vocab(min_freq=cfg.min_word_freq)
