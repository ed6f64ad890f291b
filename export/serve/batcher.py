"""Dynamic batching for the HTTP server: concurrent requests gathered into one batched call, off the event loop.

    batcher = DynamicBatcher(run_batch, BatcherConfig(max_batch=16, max_wait_ms=10, queue_size=256))
    await batcher.start()
    hyp = await batcher.submit(image, timeout_s=30)   # many coroutines at once; each gets its own result
    await batcher.stop()                               # drains what is queued, then ends the worker

One gatherer task on the event loop takes the first waiting item, then keeps taking items until ``max_batch``
are in hand or ``max_wait_ms`` has passed since the first, and hands the batch to ONE worker thread
(``run_batch(items) -> results``, same order). While that thread runs, new requests queue up; the next batch
starts as soon as the thread is free, so under load batches fill without waiting. A full queue refuses at once
(:class:`QueueFull`, HTTP 503); a request that waits longer than its timeout gets :class:`asyncio.TimeoutError`
(HTTP 504) and its item is skipped if it has not been run yet; so is the item of a submit() that is cancelled
(the server cancels the work of a client that disconnected).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(RuntimeError):
    """The request queue is at ``queue_size``: the caller should retry later."""


class Stopped(RuntimeError):
    """The batcher is shutting down and takes no new work."""


@dataclass
class BatcherConfig:
    max_batch: int = 16  # images in one batched call
    max_wait_ms: float = 10.0  # longest wait for more images once the first is in hand
    queue_size: int = 256  # waiting images; more are refused (503)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")


@dataclass
class _Item:
    payload: Any
    future: asyncio.Future


# Observers the server plugs its metrics into; all optional.
OnBatch = Callable[[int, float], None]  # (batch size, seconds in run_batch)
OnDepth = Callable[[int], None]  # queue depth after each change


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], config: BatcherConfig,
                 on_batch: OnBatch | None = None, on_depth: OnDepth | None = None):
        self.run_batch = run_batch
        self.config = config
        self.on_batch = on_batch or (lambda n, s: None)
        self.on_depth = on_depth or (lambda d: None)
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-worker")
        self._stopping = False

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.config.queue_size)
        self._task = asyncio.create_task(self._gather_loop(), name="batch-gatherer")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    async def submit(self, payload: Any, timeout_s: float | None = None) -> Any:
        """The result of ``run_batch`` for ``payload``; QueueFull, Stopped, TimeoutError, or run_batch's error."""
        if self._queue is None or self._stopping:
            raise Stopped("the server is shutting down")
        item = _Item(payload, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.config.queue_size} images are already waiting") from None
        self.on_depth(self._queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):  # timed out, or its client left
            item.future.cancel()  # not run yet: the gatherer skips it; running: its result is dropped
            raise

    async def _take_batch(self) -> list[_Item]:
        """First item (waits for it), then more until max_batch or max_wait after the first."""
        q = self._queue
        batch = [await q.get()]
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch:
            if not q.empty():
                batch.append(q.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), left))
            except asyncio.TimeoutError:
                break
        self.on_depth(q.qsize())
        return batch

    async def _gather_loop(self) -> None:
        while True:
            taken = await self._take_batch()
            try:
                batch = [it for it in taken if not it.future.done()]  # timed-out requests are not run
                if batch:
                    await self._run(batch)
            finally:
                for _ in taken:  # what stop() waits for (queue.join)
                    self._queue.task_done()

    async def _run(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._pool, self.run_batch,
                                                                       [it.payload for it in batch])
        except Exception as e:  # noqa: BLE001 - one failed batch fails its requests, never the server
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        self.on_batch(len(batch), time.perf_counter() - t0)
        for it, r in zip(batch, results):
            if not it.future.done():
                it.future.set_result(r)

    async def stop(self) -> None:
        """Refuse new work, let everything queued run, then end the gatherer and the worker thread."""
        self._stopping = True
        if self._queue is not None:
            await self._queue.join()  # every item taken has had its batch run (or was skipped, timed out)
        if self._task is not None:
            self._task.cancel()  # it is idle, waiting for an item that will not come
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
