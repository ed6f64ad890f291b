"""Progress of a batch job on stderr: images done, rate, time left; a line every few seconds and one at the end."""

from __future__ import annotations

import time

from core.logs import get_logger

log = get_logger("batch_caption")


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class BatchProgress:
    """``total`` images to write in this run. The rate counts from the first result (Ray's start and the actors'
    model loading are not in it: they are logged apart); ``steady`` leaves out the first batch too."""

    def __init__(self, total: int, every_s: float, done: int = 0):
        self.total, self.every_s = total, every_s
        self.done = self.start = done  # rows already written before Ray's results (the inputs' own errors)
        self.t0 = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, done) when the first results arrived
        self.last_line = self.t0

    def update(self, n: int) -> None:
        now = time.perf_counter()
        self.done += n
        if self.first is None:
            self.first = (now, self.done)
            log.info("first results %.1f s after the job started (actors loading the model included)", now - self.t0)
            return  # no rate yet: it counts from here
        if now - self.last_line >= self.every_s and self.done < self.total:
            self.last_line = now
            log.info("%s", self.line(now))

    def rate(self, now: float | None = None) -> float:
        """Images/s since the first results arrived, their batch excluded (the steady rate)."""
        if self.first is None:
            return 0.0
        now = now or time.perf_counter()
        return (self.done - self.first[1]) / max(now - self.first[0], 1e-9)

    def line(self, now: float) -> str:
        rate = self.rate(now)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{self.done}/{self.total} images, {rate:.1f} images/s, {_duration(left)} left"

    def finish(self, done: int) -> None:
        now = time.perf_counter()
        self.done = done
        log.info("%d/%d images in %.2f s (%.1f images/s overall; steady %.1f images/s)", self.done, self.total,
                 now - self.t0, (self.done - self.start) / max(now - self.t0, 1e-9), self.rate(now))
