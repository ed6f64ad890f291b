"""Process trees of the tests' subprocesses (torchrun agents, their workers), read from /proc."""

from __future__ import annotations

from pathlib import Path


def descendants(root: int) -> set[int]:
    """``root`` and every process below it (children of children included)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= new
        grew = bool(new)
    return tree
