"""core.fileio: atomic writes get the mode a plain open() would (0666 less the umask), as the exporter's files do."""

from __future__ import annotations

import os

import pytest

from core.fileio import atomic_write_text, current_umask


@pytest.mark.parametrize("umask", [0o077, 0o022, 0o002])
def test_atomic_write_respects_the_umask(tmp_path, umask):
    """Under umask 077 a checkpoint or skip list is the owner's alone (it used to be forced to 0644)."""
    before = os.umask(umask)
    try:
        assert current_umask() == umask
        path = atomic_write_text(tmp_path / "skip_list.json", "{}\n")
        replaced = atomic_write_text(path, "{}\n")  # over an existing file too
    finally:
        os.umask(before)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert replaced.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["skip_list.json"]  # no temporary file left
