"""The docs: ``mkdocs build --strict`` (no page links to a file or section that moved), and every command that
README.md and docs/ mark runnable runs as written from the repository root.

A runnable block is a fenced ``bash`` block right after the line ``<!-- runnable -->``; each of its lines is one
command (``#`` comments are dropped). Only cheap commands are marked (``--help`` and the like): this runs them all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*\n```bash\n(.*?)\n```", re.S)


def runnable_commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in BLOCK.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                command = line.split(" #", 1)[0].strip()
                if command and not command.startswith("#"):
                    found.append((str(page.relative_to(ROOT)), command))
    return found


COMMANDS = runnable_commands()


def test_some_commands_are_marked_runnable():
    assert len(COMMANDS) >= 5 and any(page == "README.md" for page, _ in COMMANDS)
    assert all(text.count(MARKER) == len(BLOCK.findall(text)) for text in (p.read_text() for p in PAGES)), \
        "a runnable marker must be followed by a ```bash block"


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_runnable_command(page, command):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, f"{page}: `{command}` exited {res.returncode}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


def test_mkdocs_build_is_strict_and_clean(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is a dev extra: pip install -e '.[dev]'")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
