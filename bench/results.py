"""The benchmark run's results on disk: one JSON line per event, appended and flushed as it happens.

    python bench/report.py --from-results                 # render the newest bench/results/bench-*.jsonl
    python bench/report.py --from-results FILE.jsonl      # render one (a run killed midway renders too)

Records (``"type"``): ``run`` (first: machine (:func:`machine_info`), CPU capability tag, config, budget, the planned benchmarks in run
order), ``benchmark`` (pytest-benchmark's stats and extra_info of one finished benchmark, its wall seconds),
``not_run`` (a benchmark left out, with the reason: budget, no native bf16, skipped), ``check`` (a test with no
timing passed), ``failed``, ``end`` (exit
status, load average). A run killed midway has no ``end``; the report lists its planned benchmarks that never
ran as "not run: the run was cut short".
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """The machine as the run record names it (JSON-serializable): core.hardware's detection, software versions,
    threads, load. torch and the rest are imported here, so reading results back (the report) needs none of them."""
    import numpy as np
    import torch

    from core import hardware

    hw = hardware.detect()
    info: dict[str, Any] = {
        "cpu_model": hw.cpu.model,
        "cpu_cores": hw.cpu.cores,
        "cpu_flags": sorted(hw.cpu.flags),
        "capability": hardware.capability_tag(hw),
        "hardware": hardware.summary(hw),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(Exception):
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    with contextlib.suppress(Exception):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if hw.gpus:
        info["gpu"] = hw.gpus[0].name
        info["cuda"] = torch.version.cuda
    return info


class Recorder:
    """Appends records to a JSONL file; each line is flushed to disk before the next benchmark starts."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str)  # default=str: pytest params may hold torch dtypes
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def newest(directory: Path) -> Path | None:
    runs = sorted(Path(directory).glob("bench-*.jsonl"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def load(path: Path) -> dict[str, Any]:
    """The run as the report reads it: {"run", "benchmarks", "not_run", "failed", "check", "end", "machine_info"}.

    A half-written last line (a kill mid-write) is ignored. A pytest-benchmark JSON (older runs) loads too.
    """
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {"run": {}, "benchmarks": data.get("benchmarks", []), "not_run": [], "failed": [], "check": [], "end": {},
                "machine_info": data.get("machine_info", {}), "version": data.get("version"),
                "datetime": data.get("datetime")}
    out: dict[str, Any] = {"run": {}, "benchmarks": [], "not_run": [], "failed": [], "check": [], "end": None}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = rec.get("type")
        if kind in ("run", "end"):
            out[kind] = rec
        elif kind == "benchmark":
            out["benchmarks"].append(rec)
        elif kind in ("not_run", "failed", "check"):
            out[kind].append(rec)
    done = {r["name"] for r in out["benchmarks"] + out["not_run"] + out["failed"] + out["check"]}
    if out["end"] is None:  # cut short: what was planned and never reached
        out["not_run"] += [{**p, "reason": "not run: the run was cut short before it"}
                           for p in out["run"].get("planned", []) if p["name"] not in done]
    machine = {**out["run"].get("machine", {}), "config": out["run"].get("config", {})}
    if out["end"] and out["end"].get("loadavg"):
        machine["loadavg_1_5_15"] = out["end"]["loadavg"]  # the report shows the load at the end
    out["machine_info"] = {"sat_bench": machine}
    out["datetime"] = out["run"].get("started")
    return out
