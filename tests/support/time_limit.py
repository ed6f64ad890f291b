"""A deadline for in-process test code: a regression that hangs fails the test instead of stalling CI (pytest has
no timeout plugin here; subprocesses get ``timeout=`` instead)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread once ``seconds`` have passed (SIGALRM: Unix, main thread only)."""

    def expired(_signum, _frame):
        raise TimeoutError(f"still running after {seconds:g} s: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
