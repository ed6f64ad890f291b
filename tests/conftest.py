"""Shared fixtures, and the layout of the tests.

Tests are grouped by concern: ``unit/`` (one module or function, seconds; ``unit/data/``: datasets, captions,
splits, layouts), ``integration/`` (commands and pieces end to end: training, export, runtime, server, benchmarks;
every test there is marked ``slow``, added below), ``robustness/`` (bad inputs, damaged files, limits),
``support/`` (helpers shared by tests, no tests; the fault-injecting trainer). ``-m "not slow"`` runs the quick
part.

- ``synthetic_data``: a tiny synthetic dataset in the Flickr8k layout (48 images of 64 px, 5 captions each;
  random split 38 train / 5 val / 5 test), generated once per session with ``core.synthetic``. Read-only: copy it
  before changing anything in it.
- ``run_train``: runs ``distributed/train.py`` in a subprocess (plain Python, or ``torchrun`` with ``nproc``)
  with the ``tiny`` preset and one CPU thread per process, and returns the CompletedProcess; ``FAULT_*`` variables
  in ``env`` run it through ``tests/support/fault_train.py``, which injects those faults.
- ``one_thread``: torch runs on one intra-op thread during the test (spinning OpenMP threads on shared cores cost
  several times the wall time); ``pytestmark = pytest.mark.usefixtures("one_thread")`` for a whole module.
- ``tiny_model_config(vocab_size, **overrides)``: the ``ModelConfig`` of a tiny model (ResNet-18 at 64 px, 2x2
  regions, small dims); ``tiny_model``: ``(model, vocab)`` of that config with seeded weights, in eval mode, over
  ``TINY_CAPTIONS``' vocabulary. Shared by the session: build your own from ``tiny_model_config`` to change it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.model import CaptionModel, ModelConfig
from core.vocab import Vocabulary

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "distributed" / "train.py"
FAULT_TRAIN = REPO / "tests" / "support" / "fault_train.py"  # the same trainer with faults injected (FAULT_* variables)

SYNTHETIC_IMAGES = 48
SYNTHETIC_SIZE = 64

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/integration/ is ``slow`` unless it says otherwise (its module needs no marker)."""
    for item in items:
        if INTEGRATION in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


TINY_MODEL = dict(backbone="resnet18", encoded_size=2, image_size=64, attention_dim=16, embed_dim=8, decoder_dim=16)
TINY_CAPTIONS = ["a red circle", "a blue square above a red circle", "two shapes"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_config():
    def make(vocab_size: int, **overrides) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, **{**TINY_MODEL, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_model_config) -> tuple[CaptionModel, Vocabulary]:
    torch.manual_seed(0)
    vocab = Vocabulary.build(TINY_CAPTIONS)
    return CaptionModel(tiny_model_config(len(vocab))).eval(), vocab


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from core.synthetic import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "data", SYNTHETIC_IMAGES, seed=0, size=SYNTHETIC_SIZE)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture
def run_train(synthetic_data):
    """``run_train(out, *flags, nproc=None, env=None, max_restarts=0, timeout=240)`` -> CompletedProcess.

    ``nproc=None`` runs a single plain process; an int runs ``torchrun --standalone --nproc_per_node=nproc``.
    Output is captured (text); the caller asserts on ``returncode``, ``stdout`` and ``stderr``.
    """

    def run(out: Path, *flags: str, nproc: int | None = None, env: dict | None = None, max_restarts: int = 0,
            timeout: float = 240) -> subprocess.CompletedProcess:
        cmd = [] if nproc is None else _torchrun() + ["--standalone", f"--nproc_per_node={nproc}",
                                                       f"--max-restarts={max_restarts}"]
        cmd += [] if nproc is not None else [sys.executable]
        script = FAULT_TRAIN if any(k.startswith("FAULT_") for k in env or {}) else TRAIN
        cmd += [str(script), "--data", str(synthetic_data), "--out", str(out), "--preset", "tiny", "--threads", "1",
                "--no-progress", *flags]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        for name in [k for k in full_env if k.startswith("FAULT_") and k not in (env or {})]:
            full_env.pop(name)
        return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)

    return run
