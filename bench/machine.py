"""The machine as the benchmark report names it: core.hardware's detection, software versions, threads, load."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """A dict for the report's machine section (JSON-serializable)."""
    import numpy as np

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
