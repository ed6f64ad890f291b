"""Admission of caption requests: what may be in flight at once, refused (503 + Retry-After) rather than waited for.

    budget = Budget(128 * 2**20, "bytes of uploads in flight", "--max-inflight-mb")
    if not budget.take(n): raise busy(...)      # on the event loop only: no lock
    ...
    budget.give(n)

Two budgets per server: the bytes of request bodies being received or held (an upload takes its declared
Content-Length before a byte of its body is read; a chunked one takes as it arrives), and the pixels of the images
waiting for or in a decode thread (declared by their headers, before any decode). A budget refuses only when
something else holds part of it: a lone request that passes the per-request bounds is always let in.
"""

from __future__ import annotations


class Budget:
    """A count of something in flight with a ceiling; used on the event loop only."""

    def __init__(self, limit: int, what: str, flag: str):
        self.limit, self.what, self.flag = limit, what, flag
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used and self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def refusal(self, n: int) -> str:
        return f"{self.used} {self.what} already (limit {self.limit}, {self.flag}); this request needs {n} more"


class Held:
    """What one request holds of a budget; given back once, by :meth:`release`."""

    def __init__(self, budget: Budget):
        self.budget, self.n = budget, 0

    def take(self, n: int) -> bool:
        if not self.budget.take(n):
            return False
        self.n += n
        return True

    def release(self) -> None:
        self.budget.give(self.n)
        self.n = 0
