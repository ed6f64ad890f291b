"""distributed/feature_cache.py: built once and reused, a new key when the encoder changes, nothing trusted after a
crash mid-build, a refusal with the figures when the disk is too small, not used when the encoder trains."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

from core.data import load_dataset
from core.images import ImageLoadError
from core.model import CaptionModel
from distributed.config import parse_config
from distributed.env import DistEnv
from distributed.feature_cache import FeatureCacheError, check_disk_space, open_feature_cache

pytestmark = pytest.mark.usefixtures("one_thread")
CPU1 = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), is_main=True)


def _open(model, data, folder, dtype="fp16"):
    return open_feature_cache(model, data, "train", str(folder), dtype, "fp32", contextlib.nullcontext(), CPU1,
                              batch_size=16)


def test_built_once_reused_rebuilt_on_a_new_encoder_and_a_crash_leaves_nothing_trusted(
        synthetic_data, tiny_model_config, tmp_path, caplog):
    caplog.set_level("INFO")
    data_dir = tmp_path / "data"
    shutil.copytree(synthetic_data, data_dir)
    data = load_dataset(data_dir)
    torch.manual_seed(0)
    model = CaptionModel(tiny_model_config(20)).eval()
    folder = tmp_path / "cache"

    cache = _open(model, data, folder)
    assert cache.names == data.splits["train"] and cache.features.dtype.name == "float16"
    with torch.no_grad():  # row i is image i's encoder output, to fp16's rounding
        expected = model.encoder(data.eval_images(cache.names[:3], 64)).flatten(1, 2)  # (3, P, C)
    torch.testing.assert_close(cache.rows([0, 1, 2]), expected, rtol=2e-3, atol=1e-3)
    assert _open(model, data, folder).path == cache.path
    assert "reusing" in caplog.text

    # A crash mid-build (an image that does not decode): no complete cache, only a partial folder nobody trusts.
    with torch.no_grad():
        model.encoder.resnet[0].weight.mul_(1.01)  # another encoder: another key
    victim = data.image_path(data.splits["train"][20])
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    data = load_dataset(data_dir)
    with pytest.raises(ImageLoadError):
        _open(model, data, folder)
    partial = [p for p in folder.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and not (partial[0] / "complete.json").exists()
    assert len([p for p in folder.iterdir() if (p / "complete.json").is_file()]) == 1  # the first one only

    victim.write_bytes(good)  # repaired: the next run builds it, and the partial folder is gone
    data = load_dataset(data_dir)
    rebuilt = _open(model, data, folder)
    assert rebuilt.path != cache.path and not list(folder.glob("*.partial"))


def test_a_cache_that_does_not_fit_is_refused_with_the_figures(tmp_path):
    with pytest.raises(FeatureCacheError, match=r"needs 1000000\.00 GB in .* but only [\d.]+ GB are free"):
        check_disk_space(tmp_path, 10**15)


def test_not_used_when_the_encoder_trains(synthetic_data, caplog):
    from distributed.train import feature_cache

    cfg = parse_config(["--data", str(synthetic_data), "--preset", "tiny", "--encoder-weights", "imagenet",
                        "--fine-tune-encoder", "--feature-cache", "auto"])
    assert not cfg.uses_feature_cache
    assert feature_cache(None, None, cfg, CPU1, None) is None  # before touching the model or the data
    assert "--feature-cache is not used" in caplog.text
    assert parse_config(["--feature-cache", "auto"]).uses_feature_cache  # frozen ImageNet encoder: used
