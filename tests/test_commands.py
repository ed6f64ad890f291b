"""Every command: a console script in pyproject.toml whose target exists, and the script forms still run."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_targets_a_main(name):
    module, func = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), func)), SCRIPTS[name]


@pytest.mark.parametrize("script", ["distributed/train.py", "export/to_onnx.py"])
def test_scripts_run_from_another_directory(script, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
