"""ruff over the whole tree with the rules of pyproject.toml: pyflakes, and the complexity of every function
(C901 branches, PLR0915 statements) in place of a line count."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ruff() -> list[str] | None:
    beside = Path(sys.executable).with_name("ruff")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ruff")
    return [found] if found else None


def test_ruff_passes():
    ruff = _ruff()
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]' (./launch.sh setup)")
    res = subprocess.run([*ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
