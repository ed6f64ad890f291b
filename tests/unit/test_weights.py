"""ImageNet weights from TORCH_HOME: hash-checked against torchvision's published prefix, read weights_only.

The crafted files below would create a file when unpickled (torchvision's own loader unpickles them with
weights_only=False); every test asserts that file never appears.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from core.model import Encoder, load_pretrained_encoder
from core.fileio import sha256_file
from core.weights import PretrainedWeightsError, hash_prefix, load_verified


class CreatesAFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _resnet18_cache(torch_home: Path) -> Path:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = torch_home / "hub" / "checkpoints" / Path(weights.url).name
    path.parent.mkdir(parents=True)
    return path


def _payload(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": CreatesAFile(marker)}, f)


def test_hash_prefix_is_read_from_torchvisions_file_names():
    assert hash_prefix("resnet101-63fe2227.pth") == "63fe2227"
    assert hash_prefix(Path(torchvision.models.ResNet101_Weights.IMAGENET1K_V2.url).name) == "cd907fc2"
    with pytest.raises(PretrainedWeightsError, match="no sha256 prefix"):
        hash_prefix("resnet101.pth")


@pytest.mark.parametrize("content", ["payload", "real_weights_other_hash"])
def test_a_file_in_torch_home_with_the_wrong_hash_is_refused(tmp_path, monkeypatch, content):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache, marker = _resnet18_cache(tmp_path), tmp_path / "pwned"
    if content == "payload":
        _payload(cache, marker)
    else:  # genuine tensors, but not the published file: refused all the same
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), cache)
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained_encoder(Encoder("resnet18", 2), "resnet18", "imagenet")
    msg = str(err.value)
    assert str(cache) in msg and "sha256" in msg and hash_prefix(cache.name) in msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_payload_whose_hash_matches_is_still_never_unpickled(tmp_path):
    # The hash is the first gate, weights_only the second: a file that passes the first still cannot run code.
    marker = tmp_path / "pwned"
    staged = tmp_path / "staged.pth"
    _payload(staged, marker)
    named = tmp_path / f"resnet18-{sha256_file(staged)[:8]}.pth"
    staged.rename(named)
    with pytest.raises(PretrainedWeightsError, match="plain tensors"):
        load_verified(named, hash_prefix(named.name))
    assert not marker.exists()


def test_a_file_whose_hash_matches_loads_into_the_encoder(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    staged = tmp_path / "staged.pth"
    torch.save(resnet.state_dict(), staged)
    named = tmp_path / f"resnet18-{sha256_file(staged)[:8]}.pth"
    staged.rename(named)
    state = load_verified(named, hash_prefix(named.name))
    assert torch.equal(state["conv1.weight"], resnet.conv1.weight)


def test_offline_with_an_empty_cache_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # refuses connections: no download here or anywhere
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained_encoder(Encoder("resnet18", 2), "resnet18", "imagenet")
    msg = str(err.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "f37072fd" in msg and "--encoder-weights none" in msg
    assert not list(tmp_path.rglob("*.pth*"))
