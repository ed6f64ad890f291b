"""One caption request from arrival to its images in the batcher: deadlines, admission, decoding, a client that left.

    intake = Intake(IntakeConfig(...), transform, image_size, queue_room=lambda: free_slots)
    result = await intake.handle(request, work)      # work(images) -> the answer, e.g. the batched beam search

In order, each refusal before the work it saves:
1. the batcher queue is full -> 503 before the body is read; the body's bytes are taken from the in-flight upload
   budget (--max-inflight-mb) -> 503 when it is spent (export/serve/admission.py);
2. the body is read (413 over --max-body-mb; 408 from the connection's body deadline, export/serve/protocol.py);
3. the images' pixels are read from their headers: 422 for one over --max-pixels, 413 for a request over
   --max-request-pixels; 503 when the images will not fit the batcher queue, or their pixels the decode budget
   (--max-decode-pixels);
4. decoding, in a thread: requests of at most LIGHT_PIXELS in all have a thread of their own, so a small request
   never waits behind large decodes;
5. ``work(images)`` (the batcher).
The deadline (--timeout-s, 504) counts from arrival and covers all of it. A client that leaves while its request
waits is noticed at once: its work is dropped (its images leave the batcher queue) and it is counted as 499.
"""

from __future__ import annotations

import asyncio

import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from torch import Tensor

from core.logs import get_logger
from export.serve.admission import Budget, Held
from export.serve.inputs import ClientGone, Problem, Upload, decode_uploads, read_uploads, upload_pixels
from export.serve.protocol import ENDED_BY_SERVER

log = get_logger("serve")
LIGHT_PIXELS = 1 << 22  # a request decoding at most this many pixels (4.2 Mpx) in all uses the light decode thread
CLIENT_GONE = 499  # nginx's status for "client closed request": counted in /metrics, never sent


@dataclass(frozen=True)
class IntakeConfig:
    timeout_s: float
    max_body_bytes: int
    max_images: int
    max_pixels: int  # per image
    max_request_pixels: int  # all images of one request
    max_decode_pixels: int  # all images waiting for or in the decode threads
    max_inflight_bytes: int  # all bodies being received or held
    decode_threads: int


class Intake:
    def __init__(self, cfg: IntakeConfig, transform: Callable, image_size: int, queue_room: Callable[[], int]):
        self.cfg, self.transform, self.image_size, self.queue_room = cfg, transform, image_size, queue_room
        self.bytes = Budget(cfg.max_inflight_bytes, "bytes of uploads in flight", "--max-inflight-mb")
        self.pixels = Budget(cfg.max_decode_pixels, "pixels waiting for or in decoding", "--max-decode-pixels")
        self.heavy_pool = ThreadPoolExecutor(max_workers=cfg.decode_threads, thread_name_prefix="decode")
        self.light_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-light")

    def shutdown(self) -> None:
        self.heavy_pool.shutdown(wait=True)
        self.light_pool.shutdown(wait=True)

    async def handle(self, request: Request, work: Callable[[list[Tensor]], Awaitable[Any]]) -> Any:
        deadline = time.monotonic() + self.cfg.timeout_s
        held = Held(self.bytes)
        running: list[Future] = []  # a decode job still holds the upload bytes after a 504 or a 499
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                if self.queue_room() <= 0:
                    raise busy(f"the queue is full ({self.queue_room()} free slots, --queue-size)")
                uploads = await read_uploads(request, self.cfg.max_body_bytes, self.cfg.max_images, held)
                return await until_disconnect(request, self._decode_and_work(uploads, work, deadline, running))
        except TimeoutError:
            raise Problem(504, f"not answered within {self.cfg.timeout_s:g} s of arrival (--timeout-s); the server "
                               f"is overloaded") from None
        except ClientGone as e:
            raise gone(request, str(e)) from None
        finally:
            loop = asyncio.get_running_loop()
            if running and not running[0].done():
                running[0].add_done_callback(lambda _: loop.call_soon_threadsafe(held.release))
            else:
                held.release()

    async def _decode_and_work(self, uploads: list[Upload], work, deadline: float, running: list[Future]) -> Any:
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(self.light_pool, upload_pixels, uploads, self.cfg.max_pixels,
                                            self.image_size)
        if pixels > self.cfg.max_request_pixels:
            raise Problem(413, f"the images of this request decode to {pixels} pixels in all, over the limit of "
                               f"{self.cfg.max_request_pixels} (--max-request-pixels)")
        if len(uploads) > self.queue_room():
            raise busy(f"{len(uploads)} images do not fit the queue ({self.queue_room()} free, --queue-size)")
        light = pixels <= LIGHT_PIXELS
        if not light and not self.pixels.take(pixels):
            raise busy(self.pixels.refusal(pixels))
        job = (self.light_pool if light else self.heavy_pool).submit(
            decode_uploads, uploads, self.transform, self.cfg.max_pixels, self.image_size, deadline)
        running.append(job)
        if not light:  # given back when the thread is done with them, not when the request stops waiting
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.pixels.give, pixels))
        images = await asyncio.wrap_future(job)
        return await work(images)


def busy(why: str) -> Problem:
    return Problem(503, f"server busy: {why}; retry later", {"Retry-After": "1"})


def gone(request: Request, when: str) -> Problem:
    """The status to count for a request whose connection ended: the protocol's (408, 503) or 499; one log line."""
    status = request.scope.get("state", {}).get(ENDED_BY_SERVER)
    if status is None:
        client = request.client
        log.info("client %s left %s: its work was dropped (499)", f"{client.host}:{client.port}" if client else "?",
                 when)
    return Problem(status or CLIENT_GONE, f"connection ended {when}")


async def until_disconnect(request: Request, coro: Awaitable[Any]) -> Any:
    """``coro``'s result, or ClientGone as soon as the client disconnects (its body already read): the work is
    cancelled, which takes its images out of the batcher queue."""
    work = asyncio.ensure_future(coro)
    left = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone("while its request waited")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
