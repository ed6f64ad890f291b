"""What this machine can do for the toolkit, and what the toolkit will choose: a short table.

    ./launch.sh doctor            # or: python -m distributed.doctor [--json]

The hardware rows and the choices come from ``core.hardware`` (the one place that knows the hardware); this command
adds what only the training side can check: a real DALI pipeline decoding one JPEG on the device training would
use (``mixed`` with a GPU, else ``cpu``). Exit code 0 whatever the machine lacks: it reports, it does not judge.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python distributed/doctor.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from core import hardware


def probe_dali(hw: hardware.Hardware) -> tuple[bool, str]:
    """Decode one small JPEG through the training pipeline: (works, detail)."""
    try:
        from distributed.dali_pipeline import build_iterator
    except ImportError as e:
        return False, f"nvidia.dali does not import ({e}); training uses the torch loader"
    device = hardware.choose_dali_device(hw, "cuda" if hw.cuda else "cpu").value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.jpg"
        Image.new("RGB", (48, 40), (200, 30, 30)).save(path, quality=90)
        t0 = time.perf_counter()
        try:
            it = build_iterator([str(path)], [0], image_size=32, train=False, batch_size=1, num_threads=1,
                                device_id=0 if device == "mixed" else None, seed=0)
            images = next(iter(it))[0]["images"]
        except Exception as e:  # any failure of the pipeline is "does not work", with its reason
            return False, f"a DALI pipeline on device={device!r} failed: {str(e).splitlines()[0] if str(e) else e!r}"
        if tuple(images.shape) != (1, 3, 32, 32) or not torch.isfinite(images).all():
            return False, f"DALI decoded to an unexpected tensor {tuple(images.shape)}"
    return True, f"works: decoded a JPEG with device={device!r} in {time.perf_counter() - t0:.2f}s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distributed.doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the rows as a JSON object instead of a table")
    args = p.parse_args(argv)
    hw = hardware.detect(ort=True)
    rows = hardware.table(hw)
    ok, detail = probe_dali(hw)
    rows.insert(next(i for i, (k, _) in enumerate(rows) if k.startswith("->")), ("DALI", detail))
    if args.json:
        print(json.dumps(dict(rows) | {"capability_tag": hardware.capability_tag(hw)}, indent=1))
    else:
        print(hardware.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
