"""--feature-cache: training from a frozen encoder's cached outputs gives the losses of training from the images;
the run's TensorBoard event files hold the per-step and per-evaluation scalars; the learning curve gets them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

from distributed.train import main

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 3


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's event files: tag -> [(step, value)], read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def frozen_encoder(tmp_path_factory) -> Path:
    """A 'pretrained' ResNet-18 file (seeded random weights: no download), loaded frozen as ImageNet weights are."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def train(data: Path, out: Path, weights: Path, *flags: str) -> dict[str, list[tuple[int, float]]]:
    code = main(["--data", str(data), "--out", str(out), "--preset", "tiny", "--threads", "1", "--no-progress",
                 "--encoder-weights", str(weights), "--no-random-crop", "--loader", "torch", "--max-steps", str(STEPS),
                 "--no-final-eval", "--val-max-images", "2", *flags])
    assert code == 0
    return scalars(out)


def test_cache_gives_the_image_losses_and_tensorboard_has_the_scalars(synthetic_data, frozen_encoder, tmp_path,
                                                                        capsys):
    cache = tmp_path / "cache"
    images = train(synthetic_data, tmp_path / "images", frozen_encoder)
    fp32 = train(synthetic_data, tmp_path / "fp32", frozen_encoder, "--feature-cache", str(cache),
                 "--feature-cache-dtype", "fp32")
    log = capsys.readouterr().out
    assert "feature cache built" in log and "5 caption(s) each" in log  # frozen: every caption per encoder pass
    fp16 = train(synthetic_data, tmp_path / "fp16", frozen_encoder, "--feature-cache", str(cache), "--random-crop")
    log = capsys.readouterr().out
    assert "augmentation off" in log

    # The same first steps: to float32 rounding with an fp32 cache, within fp16's rounding with the default.
    loss = {name: [v for _, v in run["train/loss"]] for name, run in (("images", images), ("fp32", fp32),
                                                                      ("fp16", fp16))}
    assert len(loss["images"]) == STEPS and [s for s, _ in images["train/loss"]] == [1, 2, 3]
    torch.testing.assert_close(torch.tensor(loss["fp32"]), torch.tensor(loss["images"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(loss["fp16"]), torch.tensor(loss["images"]), rtol=0, atol=2e-3)

    # Every scalar the docs list, per step and per evaluation, and the attention figure.
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/captions_per_s", "train/data_wait_share"):
        assert len(images[tag]) == STEPS, tag
    assert all(v > 0 for _, v in images["train/grad_norm"]) and all(0 <= v <= 1 for _, v in
                                                                      images["train/data_wait_share"])
    assert [s for s, _ in images["val/bleu4"]] == [STEPS] and "val/loss" in images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "images" / "tensorboard"))
    acc.Reload()
    assert any(tag.startswith("attention/") for tag in acc.Tags()["images"])

    # The second run with the same key reused the cache; the fp16 one (another key) built its own beside it.
    assert len([p for p in cache.iterdir() if (p / "complete.json").is_file()]) == 2
    assert not list(cache.glob("*.partial"))
    key = json.loads(next(cache.glob("*/complete.json")).read_text())
    assert {"encoder_sha256", "files_sha256", "transform", "stored"} <= set(key)


def test_scst_trains_from_cached_features(synthetic_data, frozen_encoder, tmp_path, capsys):
    """SCST's samples come from the decoder over cached features (no encoder pass): the stage runs and logs."""
    code = main(["--data", str(synthetic_data), "--out", str(tmp_path / "run"), "--preset", "tiny", "--threads", "1",
                 "--encoder-weights", str(frozen_encoder), "--no-random-crop", "--loader", "torch", "--max-steps", "2",
                 "--no-final-eval", "--val-max-images", "2", "--feature-cache", str(tmp_path / "cache"),
                 "--scst-after", "1", "--scst-samples", "2", "--max-decode-len", "6", "--log-every", "1",
                 "--no-tensorboard"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line and "loss" in line]
    assert "scst reward" not in lines[0] and "scst reward" in lines[1], lines  # step 1 cross-entropy, step 2 SCST
