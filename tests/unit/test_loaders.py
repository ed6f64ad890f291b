"""The torch and DALI loaders: same batch format, same sample order, same pixels up to the resize filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import load_dataset
from core.images import IMAGENET_MEAN, IMAGENET_STD, image_transform, load_image, train_resize_size
from distributed.env import DistEnv
from distributed.loaders import EvalLoader, dali_available, eval_shard, make_train_loader, train_indices

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali does not import")
LOADERS = ["torch", pytest.param("dali", marks=needs_dali)]


def cpu_env(rank: int = 0, world: int = 1) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, device=torch.device("cpu"),
                   is_main=rank == 0)


@pytest.fixture(scope="module")
def dataset(synthetic_data):
    data = load_dataset(synthetic_data)
    vocab = data.build_vocab(min_freq=1)
    return data, vocab


def _normalize(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


# --------------------------------------------------------------------------------------------------- pixels
@needs_dali
@pytest.mark.parametrize("size", [64, 48, 80])
def test_dali_cpu_eval_pipeline_matches_the_torch_transform(synthetic_data, size, one_thread):
    """Same decoder (libjpeg-turbo) -> identical at the stored size (64); downscale/upscale -> the two
    antialiased linear resize implementations differ by a few grey levels at most, ~0 on average."""
    from distributed.dali_pipeline import build_iterator

    files = sorted(str(p) for p in (synthetic_data / "Images").glob("*.jpg"))[:8]
    it = build_iterator(files, list(range(8)), size, train=False, batch_size=8, num_threads=1, device_id=None, seed=0)
    out = next(iter(it))[0]
    dali = out["images"]
    assert dali.shape == (8, 3, size, size) and dali.dtype == torch.float32
    assert out["labels"].reshape(-1).tolist() == list(range(8))
    ref = torch.stack([image_transform(size, train=False)(load_image(f)) for f in files])
    diff = (dali - ref).abs()
    grey_level = 1 / 255 / min(IMAGENET_STD)  # one uint8 step after normalization
    if size == 64:
        assert diff.max() < 1e-5  # no resize at all: the same decoded pixels
    else:
        assert diff.max() <= 8 * grey_level and diff.mean() < 0.1 * grey_level


@needs_dali
def test_dali_train_crop_is_a_uniform_integer_offset_of_the_resized_image(synthetic_data, one_thread):
    from distributed.dali_pipeline import build_iterator

    size = 56
    r = train_resize_size(size)  # 63
    files = sorted(str(p) for p in (synthetic_data / "Images").glob("*.jpg"))[:8]
    it = build_iterator(files, list(range(8)), size, train=True, batch_size=8, num_threads=1, device_id=None, seed=3)
    dali = next(iter(it))[0]["images"]
    grey_level = 1 / 255 / min(IMAGENET_STD)
    offsets = set()
    for i, f in enumerate(files):
        big = _normalize(load_image(f).resize((r, r), Image.Resampling.BILINEAR))
        err, x, y = min(((dali[i] - big[:, y:y + size, x:x + size]).abs().max().item(), x, y)
                        for x in range(r - size + 1) for y in range(r - size + 1))
        assert err <= 1.5 * grey_level, f"image {i}: no integer crop offset matches (best {err} at {x},{y})"
        offsets.add((x, y))
    assert len(offsets) > 1  # random, not a fixed centre crop


# ---------------------------------------------------------------------------------------------- sampling
def test_train_order_shards_pad_and_resume():
    n = 38
    for world in (1, 2, 4):
        shards = [train_indices(n, cpu_env(r, world), epoch=3, seed=7) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
        assert set().union(*shards) == set(range(n))
        assert sum(map(len, shards)) - n < world  # padding: fewer than one sample per rank
    assert train_indices(n, cpu_env(), 3, 7) == train_indices(n, cpu_env(), 3, 7)
    assert train_indices(n, cpu_env(), 3, 7) != train_indices(n, cpu_env(), 4, 7)
    for world in (1, 3, 4, 7):
        parts = [eval_shard(5, cpu_env(r, world)) for r in range(world)]
        assert sorted(sum(parts, [])) == list(range(5))  # each image exactly once, no padding


@pytest.mark.parametrize("kind", LOADERS)
def test_train_loader_batches(dataset, kind, one_thread):
    data, vocab = dataset
    table = data.caption_table("train", vocab)
    env = cpu_env(1, 2)
    loader = make_train_loader(kind, data, table, 64, 8, env, seed=5, workers=0 if kind == "torch" else 1)
    batches = list(loader.epoch(2))
    assert len(batches) == loader.num_batches == 3  # 38 images / 2 ranks = 19 -> 8 + 8 + 3
    assert [b.images.shape[0] for b in batches] == [8, 8, 3]
    b = batches[0]
    assert b.images.shape == (8, 3, 64, 64) and b.images.dtype == torch.float32
    assert b.captions.dtype == torch.int64 and b.lengths.dtype == torch.int64 and b.lengths.shape == (8,)
    assert b.captions.shape[1] == int(b.lengths.max())
    assert (b.captions[:, 0] == vocab.start_id).all()
    assert (b.captions.gather(1, (b.lengths - 1)[:, None]).squeeze(1) == vocab.end_id).all()
    order = torch.cat([x.indices for x in batches]).tolist()
    assert order == train_indices(len(data.splits["train"]), env, 2, 5)
    # captions come from the table by index: the same rule in both loaders
    expected, _ = table.sample(batches[1].indices, epoch=2, seed=5)
    assert torch.equal(batches[1].captions, expected)
    # starting mid-epoch yields exactly the remaining batches
    tail = list(loader.epoch(2, start_batch=1))
    assert [x.indices.tolist() for x in tail] == [x.indices.tolist() for x in batches[1:]]
    loader.close()


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world", [1, 2, 4, 7])
def test_eval_loader_sees_every_image_once(dataset, kind, world, one_thread):
    data, vocab = dataset
    table = data.caption_table("val", vocab)
    seen = []
    for rank in range(world):
        loader = EvalLoader(data, table, 64, 2, cpu_env(rank, world), kind, workers=0 if kind == "torch" else 1)
        for _ in range(2):  # a second pass (the next epoch) gives the same images
            got = [i for b in loader for i in b.indices.tolist()]
            assert len(got) == len(set(got))
        seen += got
        loader.close()
    assert sorted(seen) == list(range(len(data.splits["val"])))


@pytest.mark.parametrize("kind", LOADERS)
def test_torch_and_dali_eval_batches_agree(dataset, kind, one_thread):
    data, vocab = dataset
    table = data.caption_table("val", vocab)
    batches = list(EvalLoader(data, table, 64, 3, cpu_env(), kind, workers=0 if kind == "torch" else 1))
    images = torch.cat([b.images for b in batches])
    idx = torch.cat([b.indices for b in batches])
    ref = torch.stack([image_transform(64, train=False)(load_image(data.image_path(data.splits["val"][i])))
                       for i in idx.tolist()])
    assert torch.allclose(images, ref, atol=1e-5)
