"""Captioning a large folder streams in batches: peak memory of 5,000 images stays near that of 500.

Slow (about a minute on 2 cores): run with `pytest -m slow tests/robustness/test_robustness_memory.py`, or run
`python tests/support/memory.py` for the figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import memory as robustness_memory


@pytest.mark.slow
@pytest.mark.extended
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path: Path):
    r = robustness_memory.measure(tmp_path, small=500, large=5000, size=48, batch_size=16)
    small, large = r[500]["peak_rss_mib"], r[5000]["peak_rss_mib"]
    print(f"peak RSS: 500 images {small} MiB ({r[500]['seconds']} s), 5000 images {large} MiB ({r[5000]['seconds']} s)")
    assert large < 1.25 * small + 50, r
