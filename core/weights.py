"""Pretrained (ImageNet) encoder weights, read without running pickled code.

torchvision's own loader (``WeightsEnum.get_state_dict``) checks a file's hash only when it downloads it, then
unpickles whatever sits in the cache with ``weights_only=False``: a file placed in ``TORCH_HOME`` (where the offline
message tells users to put it) could run code. Here the cached file's sha256 must start with the prefix torchvision
publishes in the file name (``resnet101-cd907fc2.pth`` -> ``cd907fc2...``), and it is read with ``weights_only=True``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from core.fileio import load_weights_only, sha256_file


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be used; the message says why and what to do."""


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torchvision's naming: <arch>-<sha256 prefix>.pth


def hash_prefix(file_name: str) -> str:
    """The sha256 prefix torchvision publishes in a weight file's name."""
    match = _HASH_IN_NAME.search(file_name)
    if match is None:
        raise PretrainedWeightsError(f"{file_name}: no sha256 prefix in the name, cannot verify it")
    return match.group(1)


def load_verified(path: Path, expected_prefix: str) -> dict:
    """Read a state_dict from ``path`` only if its sha256 starts with ``expected_prefix``; never unpickles code."""
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: not a regular file")
    actual = sha256_file(path)
    if not actual.startswith(expected_prefix):
        raise PretrainedWeightsError(
            f"refusing {path}: its sha256 is {actual[:16]}..., torchvision publishes {expected_prefix}... for this "
            f"file; it is damaged or not the published weights (delete it, or replace it with the published file)")
    try:
        state = load_weights_only(path, map_location="cpu")
    except Exception as e:  # an UnpicklingError names the refused global; anything else is a broken file
        raise PretrainedWeightsError(f"could not read {path} as plain tensors: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: not a state_dict of tensors")
    return state


def imagenet_state_dict(weights) -> dict:
    """The state_dict of a torchvision ``WeightsEnum`` member, from TORCH_HOME's cache or downloaded there."""
    name = Path(weights.url).name
    expected = hash_prefix(name)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cache.exists():
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            # Checks the hash of what it downloaded before moving it into place.
            torch.hub.download_url_to_file(weights.url, str(cache), hash_prefix=expected, progress=False)
        except Exception as e:  # URLError, socket timeouts, hash mismatch: all mean "no usable file"
            raise PretrainedWeightsError(
                f"could not download ImageNet weights {weights} ({weights.url}): {e}.\n"
                f"Without network access, place the file at {cache} (torch hub directory {torch.hub.get_dir()}, set by "
                f"TORCH_HOME; its sha256 must start with {expected}), or pass a local file with --encoder-weights PATH, "
                f"or train from scratch with --encoder-weights none.") from None
    return load_verified(cache, expected)
