"""Fixtures and options of the benchmark suite (see bench/report.py for the usual way to run it).

    pytest bench/ --benchmark-group-by=group              # the full suite (real shapes, a few minutes)
    pytest bench/ --bench-quick                            # CI smoke: small shapes, few rounds (SAT_BENCH_QUICK=1)
    pytest bench/ -m bench_step                            # one family: bench_encoder, bench_step, bench_caption,
                                                           # bench_beam, bench_train
    pytest bench/ -m "not gpu"                             # CPU only (GPU rows skip themselves without CUDA)
    pytest bench/ --bench-budget-min 8 --bench-results r.jsonl   # time budget; each result appended as it ends

The hooks below run the benchmarks in bench/plan.py's order, leave out what the budget or the CPU rules out
(recorded as not run, with the reason) and append every result to the JSONL file (bench/results.py) as soon as
it is measured.
"""

from __future__ import annotations

import os
import sys
import time
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
    "bench_batch": "batch captioning on Ray Data against the caption command (test_bench_batch.py)",
    "bench_train": "training step and data loader benchmarks (test_bench_train.py)",
    "gpu": "needs a CUDA GPU (skipped without one)",
}


def pytest_addoption(parser):
    group = parser.getgroup("sat-bench")
    group.addoption("--bench-quick", action="store_true", help="small shapes and few rounds (= SAT_BENCH_QUICK=1)")
    group.addoption("--bench-threads", type=int, default=None, help="intra-op threads (= SAT_BENCH_THREADS; default all cores)")
    group.addoption("--bench-budget-min", type=float, default=None,
                    help="start no benchmark that would end past this many minutes (= SAT_BENCH_DEADLINE, an epoch time)")
    group.addoption("--bench-results", type=Path, default=None, help="append each result to this JSONL (= SAT_BENCH_RESULTS)")


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
    from bench.plan import order

    for item in items:  # the training benchmarks carry no family marker of their own
        if item.path.name == "test_bench_train.py":
            item.add_marker(pytest.mark.bench_train)
    order(items)


class _Run:
    """The run's budget and results file (one per session, set up once the benchmarks are collected)."""

    def __init__(self, config, items):
        from bench.config import config_from_env
        from bench.plan import Budget, estimate_s, item_params
        from bench.results import Recorder, machine_info
        from core import hardware

        self.hw, self.cfg = hardware.detect(), config_from_env()
        self.tag = hardware.capability_tag(self.hw)
        minutes = config.getoption("--bench-budget-min")
        deadline = time.time() + 60 * minutes if minutes is not None else float(os.environ.get("SAT_BENCH_DEADLINE") or 0) or None
        self.budget = Budget.for_hardware(deadline, self.hw)
        path = config.getoption("--bench-results") or os.environ.get("SAT_BENCH_RESULTS")
        self.recorder = Recorder(Path(path)) if path else None
        planned = [{"name": it.name, "group": _group(it), "estimate_s": round(estimate_s(item_params(it), self.cfg), 1)}
                   for it in items]
        self.write(type="run", started=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine_info(),
                   config=self.cfg.describe(), capability=self.tag,
                   hardware=hardware.summary(self.hw), deadline=deadline, planned=planned)

    def write(self, **record):
        if self.recorder:
            self.recorder.write(record)


def _group(item) -> str | None:
    mark = item.get_closest_marker("benchmark")
    return mark.kwargs.get("group") if mark else None


def pytest_collection_finish(session):
    session.config._sat_run = _Run(session.config, session.items)


def pytest_runtest_setup(item):
    """Leave out (before any fixture is built) what this CPU or the remaining budget rules out."""
    from bench.plan import item_params, not_run_reason

    run = item.config._sat_run
    if item.get_closest_marker("gpu"):
        return  # GPU rows skip themselves without CUDA; they are not budgeted
    params = item_params(item)
    reason = not_run_reason(params, run.hw)
    if reason is None:
        est, reason = run.budget.check(params, run.cfg)
        item._sat_estimate = est
    if reason:
        run.write(type="not_run", name=item.name, group=_group(item), reason=reason)
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Append each finished benchmark (or failure) to the results file as soon as its call ends."""
    from bench.plan import item_params

    outcome = yield
    report = outcome.get_result()
    run = getattr(item.config, "_sat_run", None)
    if run is None or report.when != "call":
        return
    if hasattr(item, "_sat_estimate"):  # a budgeted (CPU) benchmark: teaches the budget this machine's speed
        run.budget.finished(item_params(item), run.cfg, call.duration)
    bench = item.funcargs.get("benchmark")
    stats = getattr(bench, "stats", None)
    if report.failed:
        run.write(type="failed", name=item.name, group=_group(item), seconds=round(call.duration, 2),
                  reason=str(report.longrepr).splitlines()[-1][:500])
    elif report.skipped:
        run.write(type="not_run", name=item.name, group=_group(item), reason=f"skipped: {report.longrepr[-1]}")
    elif stats is not None:
        d = stats.as_dict(include_data=False)
        run.write(type="benchmark", name=d["name"], group=d["group"], stats=d["stats"], extra_info=d["extra_info"],
                  params=d["params"], seconds=round(call.duration, 2), cpu=run.tag,
                  estimate_s=round(getattr(item, "_sat_estimate", 0), 1))
    else:  # a check with no timing (agreement, parity): its pass is the result
        run.write(type="check", name=item.name, seconds=round(call.duration, 2))


def pytest_sessionfinish(session, exitstatus):
    run = getattr(session.config, "_sat_run", None)
    if run:
        run.write(type="end", exitstatus=int(exitstatus), loadavg=[round(x, 2) for x in os.getloadavg()])


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.config import config_from_env
    from bench.results import machine_info as our_info

    machine_info["sat_bench"] = our_info()
    machine_info["sat_bench"]["config"] = config_from_env().describe()


@pytest.fixture(scope="session")
def bench_cfg():
    from bench.config import config_from_env

    return config_from_env()


@pytest.fixture(scope="session")
def bench_suite(bench_cfg, tmp_path_factory, request):
    """bench_suite(device) -> bench.suite.Suite, built (model, export, backends) once per device and config."""
    from bench.plan import item_params
    from bench.suite import cuda_available, get_suite

    root = tmp_path_factory.mktemp("sat-bench")

    def get(device: str = "cpu"):
        if device == "cuda" and not cuda_available():
            pytest.skip("no CUDA GPU")
        return get_suite(bench_cfg, device, root)

    if any(item_params(it).get("device") == "cpu" for it in request.session.items):
        get("cpu")  # built in this set-up, so the model and export time is in no benchmark's call (the budget's)
    return get


@pytest.fixture(scope="session")
def bench_bandwidth(bench_cfg):
    """Memory bandwidth measured once in this run (the decoder-step floor divides by it)."""
    from bench.floor import measure_bandwidth

    return measure_bandwidth(bench_cfg.bandwidth_mb)


@pytest.fixture(scope="session")
def bench_peak(bench_cfg):
    """Arithmetic peak of this CPU measured once in this run: fp32 GEMM (torch) and int8 GEMM (ORT's kernels)."""
    from bench.floor import measure_peak

    return measure_peak(bench_cfg.num_threads, quick=bench_cfg.quick)
