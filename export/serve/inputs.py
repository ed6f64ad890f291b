"""What a client sends to POST /v1/captions, turned into model inputs or a clear HTTP error.

Accepted: multipart/form-data with one or more file fields named ``image`` (``curl -F image=@a.jpg``), or one
raw image as the body (``Content-Type: image/jpeg`` etc., or ``application/octet-stream``). The bytes only ever
go to core.images (the toolkit's one loader: formats judged by content, pixel limit checked from the header
before any decode); nothing a client sends is taken as a path, and nothing is unpickled.

Statuses: 413 body over the limit or too many images; 415 a media type that is not an image (by header, or by
content: a GIF, a PDF); 422 no image field, bytes that are no image, an undecodable or truncated image, a
decompression bomb or an image over the pixel limit; 503 when the in-flight upload bytes are spent. The message
names the image (its field index and file name) and the problem. A client that disconnects while its body is read
raises ClientGone (counted as 499 by export/serve/intake.py, never a traceback).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from torch import Tensor

from core.images import ImageLoadError, image_bytes_size, load_image_bytes
from export.serve.admission import Held

RAW_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/x-ms-bmp",
                       "image/tiff", "application/octet-stream"})
FIELD = "image"
# the core.images kind of a known format we do not take (GIF, PDF, ...), as opposed to a broken image
_UNSUPPORTED_KINDS = frozenset({"unsupported-format"})


class Problem(Exception):
    """An HTTP error for the client: status, a message naming the problem, optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


@dataclass
class Upload:
    name: str  # for messages: "image 2 (cat.jpg)"
    data: bytes | bytearray


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


class ClientGone(Exception):
    """The client closed its connection before the answer (or the server ended it: a deadline, the shutdown)."""


async def read_body(request: Request, limit: int, held: Held | None = None) -> bytearray:
    """The whole body, refused (413) as soon as it is known to exceed ``limit`` bytes, or (503) when ``held``, the
    request's share of the in-flight upload bytes, cannot take it: the declared Content-Length before any byte is
    read, a chunked body as it arrives. ClientGone if the connection ends first."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes (--max-body-mb)")
    if held is not None and declared.isdigit() and not held.take(int(declared)):
        raise _busy_bytes(held, int(declared))
    body = bytearray()  # grows in place: no list of chunks joined into a second copy
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise Problem(413, f"body is over the limit of {limit} bytes (--max-body-mb)")
            if held is not None and len(body) + len(chunk) > held.n and not held.take(len(chunk)):
                raise _busy_bytes(held, len(chunk))
            body += chunk
    except ClientDisconnect:
        raise ClientGone(f"after {len(body)} bytes of the body") from None
    return body


def _busy_bytes(held: Held, n: int) -> Problem:
    return Problem(503, f"server busy: {held.budget.refusal(n)}; retry later", {"Retry-After": "1"})


async def _once(data: bytes | bytearray) -> AsyncIterator[bytes | bytearray]:
    yield data


async def _multipart(request: Request, body: bytearray, max_images: int) -> list[Upload]:
    parser = MultiPartParser(request.headers, _once(body), max_files=max_images, max_fields=100,
                             max_part_size=max(len(body), 1))
    try:
        form = await parser.parse()
        body.clear()  # the parts hold the images now: the body's copy goes before they are read
    except MultiPartException as e:
        if "Too many files" in str(e):
            raise Problem(413, f"more than {max_images} images in one request (--max-images)") from None
        raise Problem(400, f"multipart body: {e}") from None
    uploads = []
    try:
        for i, value in enumerate(form.getlist(FIELD), 1):
            if not isinstance(value, UploadFile):
                raise Problem(415, f"image {i}: the '{FIELD}' field must be a file upload (curl -F {FIELD}=@FILE)")
            label = f"image {i} ({value.filename})" if value.filename else f"image {i}"
            kind = _media_type(value.content_type)
            if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
                raise Problem(415, f"{label}: media type {kind} is not an image")
            uploads.append(Upload(label, await value.read()))
    finally:
        await form.close()
    return uploads


async def read_uploads(request: Request, limit: int, max_images: int, held: Held | None = None) -> list[Upload]:
    """The images of a request (see the module docstring), or a Problem (ClientGone if the client left)."""
    kind = _media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        uploads = await _multipart(request, await read_body(request, limit, held), max_images)
    elif kind in RAW_TYPES:
        uploads = [Upload("image 1 (request body)", await read_body(request, limit, held))]
    else:
        raise Problem(415, f"content type {kind or '(none)'} is not accepted: send multipart/form-data with "
                           f"'{FIELD}' file fields, or one image body ({', '.join(sorted(RAW_TYPES))})")
    if not uploads:
        raise Problem(422, f"no '{FIELD}' field in the form: send the image as -F {FIELD}=@FILE")
    if len(uploads) > max_images:
        raise Problem(413, f"{len(uploads)} images in one request; at most {max_images} (--max-images)")
    return uploads


def _load_error(name: str, e: ImageLoadError) -> Problem:
    status = 415 if e.kind in _UNSUPPORTED_KINDS else 422
    return Problem(status, f"{name}: {e.kind}: {e.detail}")


def upload_pixels(uploads: list[Upload], max_pixels: int, image_size: int) -> int:
    """The pixels the uploads will decode at, from their headers alone (nothing decoded); the first bad one is the
    error (the same statuses and messages as decode_uploads). Fast: runs before admission to the decode threads."""
    total = 0
    for u in uploads:
        try:
            w, h = image_bytes_size(u.data, u.name, max_pixels=max_pixels, reduce_for=image_size)
        except ImageLoadError as e:
            raise _load_error(u.name, e) from None
        total += w * h
    return total


def decode_uploads(uploads: list[Upload], transform: Callable, max_pixels: int, image_size: int,
                   deadline: float = math.inf) -> list[Tensor]:
    """Each upload through core.images and the model's transform -> [3,S,S]; the first bad one is the error.

    Runs in a worker thread (decoding is CPU work the event loop must not wait on). A large JPEG decodes at a
    reduced scale, at least twice ``image_size`` (core.images.reduce_jpeg_scale), as the caption command does.
    Past ``deadline`` (time.monotonic()) no further image is decoded: the request has had its 504."""
    out = []
    for u in uploads:
        if time.monotonic() > deadline:
            raise Problem(504, "not decoded within --timeout-s")
        try:
            out.append(transform(load_image_bytes(u.data, u.name, max_pixels=max_pixels, reduce_for=image_size)))
        except ImageLoadError as e:
            raise _load_error(u.name, e) from None
    return out
