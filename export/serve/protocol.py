"""uvicorn's httptools protocol with per-connection bounds: header size (431), header and body deadlines (408), a
connection limit (503), and a prompt end for requests still uploading at shutdown (503).

    config = uvicorn.Config(app, http=guarded_protocol(ConnectionLimits(max_header_bytes=32 * 1024)))

Why here and not in the app: the app sees a request only once its headers are complete, so a never-ending header or a
client that sends nothing is invisible to it. Why not h11 (whose ``h11_max_incomplete_event_size`` bounds headers):
it parses in Python, more CPU per request than httptools. httptools itself has no bound, and its cost grows with the
square of a header's length (it concatenates the value it is given piece by piece: 2, 4 and 8 MiB of one header
took 0.05, 0.15 and 0.90 s of the event loop, Zen 3), so the bytes are counted before they reach the parser, and
a request whose header section passes the bound gets 431 and the connection is closed.

Responses written here use the app's error format ({"error", "status"}) and say ``Connection: close``. When a
deadline or the shutdown ends a request the app is already reading, the request's scope state gets
``ended_by_server`` = the status sent, so the app counts it under that status and not as a client that left.
"""

from __future__ import annotations

import asyncio
import json

from dataclasses import dataclass

from core.logs import get_logger
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = get_logger("serve")
LINGER_S = 1.0
ENDED_BY_SERVER = "ended_by_server"  # key in a request's scope["state"]
# the headers every response of this server carries (export/serve/guards.py adds them to the app's)
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"))


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 32 * 1024  # request line + headers; more: 431
    header_timeout_s: float = 10.0  # from connection (or the previous answer) to the end of the headers; then 408
    body_timeout_s: float = 20.0  # from the end of the headers to the end of the body; then 408
    max_connections: int = 128  # open connections; more are answered 503 and closed at once


def error_response(status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    body = json.dumps({"error": message, "status": status}).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n"]
    head += [name + b": " + value + b"\r\n" for name, value in (*SECURITY_HEADERS, *extra)]
    return b"".join(head) + b"\r\n" + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()  # set per server by guarded_protocol()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0  # bytes fed while the headers of a request are awaited
        self._in_body = False
        self._deadline: asyncio.TimerHandle | None = None
        self._lingering = False
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open (--max-connections %d)", len(self.connections) - 1,
                        self.limits.max_connections)
            self._answer(503, f"too many connections (--max-connections {self.limits.max_connections}); retry "
                              f"later", ((b"retry-after", b"1"),))
            return
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- bytes in: the header section is counted before httptools sees it
    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and closing: what the client still sends is dropped unparsed
        while data and self.parser is not None and not self._lingering and not self.transport.is_closing():
            room = len(data) if self._in_body else self.limits.max_header_bytes + 1 - self._header_bytes
            chunk, data = data[:room], data[room:]
            if not self._in_body:
                self._header_bytes += len(chunk)
            super().data_received(chunk)
            if not self._in_body and self._header_bytes > self.limits.max_header_bytes and not self._lingering \
                    and not self.transport.is_closing():
                self._refuse(431, f"request headers over {self.limits.max_header_bytes} bytes (--max-header-kb)")

    def on_headers_complete(self) -> None:
        self._in_body = True
        super().on_headers_complete()
        self._arm(self.limits.body_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body, self._header_bytes = False, 0
        self._disarm()  # the next request's header deadline starts once this one is answered

    def on_response_complete(self) -> None:
        if not self.pipeline and self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._linger()  # answered before its body was read (an error, a GET with a body): no waiting for it
            return
        super().on_response_complete()
        if not self.transport.is_closing() and self._deadline is None:
            self._arm(self.limits.header_timeout_s, self._header_timeout)

    def shutdown(self) -> None:
        if self._in_body and self.cycle is not None and not self.cycle.response_started:
            self._end_request(503, "the server is shutting down; the upload was not finished")  # no 35 s wait
            return
        super().shutdown()

    # -- deadlines
    def _arm(self, seconds: float, callback) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timeout(self) -> None:
        self._deadline = None
        if self._in_body or self.transport.is_closing():
            return
        if self._header_bytes == 0:  # sent nothing (or nothing since its last answer): just close
            self.transport.close()
            return
        self._refuse(408, f"request headers not complete within {self.limits.header_timeout_s:g} s "
                          f"(--header-timeout-s)")

    def _body_timeout(self) -> None:
        self._deadline = None
        if not self._in_body or self.transport.is_closing():
            return
        self._refuse(408, f"request body not complete within {self.limits.body_timeout_s:g} s (--body-timeout-s)")

    # -- answers written here, not by the app
    def _refuse(self, status: int, message: str) -> None:
        """A bound was passed: one warning in the log, ``status`` with ``message`` to the client, then close."""
        log.warning("%s: %d, connection closed", message, status)
        self._end_request(status, message)

    def _end_request(self, status: int, message: str) -> None:
        """Answer ``status`` unless the app has started its answer, tell the app, close the connection."""
        cycle = self.cycle if self._in_body else None
        if cycle is not None and cycle.response_started:
            self.transport.close()
            return
        if cycle is not None:
            cycle.scope["state"][ENDED_BY_SERVER] = status
            cycle.disconnected = True  # the app's receive() now says http.disconnect; its send() is a no-op
            cycle.message_event.set()
        self._answer(status, message)

    def _answer(self, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        if self._lingering or self.transport.is_closing():
            return
        self.transport.write(error_response(status, message, extra))
        self._linger()

    def _linger(self) -> None:
        """Close after the answer, reading and dropping what the client still sends for up to LINGER_S: closing
        with unread bytes would reset the connection, and the client could lose the answer before reading it."""
        if self._lingering:
            return
        self._lingering = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._arm(LINGER_S, self.transport.close)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits (uvicorn instantiates it itself)."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
