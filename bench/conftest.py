"""Fixtures and options of the benchmark suite (see bench/report.py for the usual way to run it).

    pytest bench/ --benchmark-group-by=group              # the full suite (real shapes, a few minutes)
    pytest bench/ --bench-quick                            # CI smoke: small shapes, few rounds (SAT_BENCH_QUICK=1)
    pytest bench/ -m bench_step                            # one family: bench_encoder, bench_step, bench_caption,
                                                           # bench_beam, bench_train
    pytest bench/ -m "not gpu"                             # CPU only (GPU rows skip themselves without CUDA)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKERS = {
    "bench_encoder": "encoder benchmarks (eager fp32/bf16, TorchScript, ONNX Runtime)",
    "bench_step": "decoder step benchmarks (with the memory-bandwidth floor)",
    "bench_caption": "end-to-end captioning benchmarks and the caption agreement checks",
    "bench_beam": "beam search alone (encoder outputs given)",
    "bench_train": "training step and data loader benchmarks (test_bench_train.py)",
    "gpu": "needs a CUDA GPU (skipped without one)",
}


def pytest_addoption(parser):
    group = parser.getgroup("sat-bench")
    group.addoption("--bench-quick", action="store_true", help="small shapes and few rounds (= SAT_BENCH_QUICK=1)")
    group.addoption("--bench-threads", type=int, default=None, help="intra-op threads (= SAT_BENCH_THREADS; default all cores)")


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    # Before the test modules are imported: their parametrization reads the config from the environment.
    if config.getoption("--bench-quick", default=False):
        os.environ["SAT_BENCH_QUICK"] = "1"
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        os.environ["SAT_BENCH_THREADS"] = str(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:  # the training benchmarks carry no family marker of their own
        if item.path.name == "test_bench_train.py":
            item.add_marker(pytest.mark.bench_train)


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.config import config_from_env
    from bench.suite import machine_info as our_info

    machine_info["sat_bench"] = our_info()
    machine_info["sat_bench"]["config"] = config_from_env().describe()


@pytest.fixture(scope="session")
def bench_cfg():
    from bench.config import config_from_env

    return config_from_env()


@pytest.fixture(scope="session")
def bench_suite(bench_cfg, tmp_path_factory):
    """bench_suite(device) -> bench.suite.Suite, built (model, export, backends) once per device and config."""
    from bench.suite import cuda_available, get_suite

    root = tmp_path_factory.mktemp("sat-bench")

    def get(device: str = "cpu"):
        if device == "cuda" and not cuda_available():
            pytest.skip("no CUDA GPU")
        return get_suite(bench_cfg, device, root)

    return get


@pytest.fixture(scope="session")
def bench_bandwidth(bench_cfg):
    """Memory bandwidth measured once in this run (the decoder-step floor divides by it)."""
    from bench.floor import measure_bandwidth

    return measure_bandwidth(bench_cfg.bandwidth_mb)
