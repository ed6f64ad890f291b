"""Whom the server answers: the Host it is reached by, the origins allowed to POST, the headers on every response.

    app = HostAndOriginGuard(app, allowed_hosts={"localhost", "127.0.0.1", "::1"}, cors_origins=set())

- Host: a request whose Host header (port aside) is not an allowed name gets 421 in the server's error format. A
  page on another site whose name an attacker points at 127.0.0.1 (DNS rebinding) sends its own name as Host, so
  it is refused. ``*`` allows any host.
- Origin: a browser says where a page came from in ``Origin``. A POST (or OPTIONS) from an origin other than this
  server's own is refused 403 before its body is read, unless ``--cors-origin`` names it; then the answers carry
  ``Access-Control-Allow-Origin`` and a preflight (OPTIONS) is answered. Requests without Origin (curl, scripts)
  are not browsers' and pass.
- Every response: ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and a CSP with
  ``frame-ancestors 'none'`` (no page may frame this one), unless the app set its own CSP (the web page's).
"""

from __future__ import annotations

import json

from collections.abc import Iterable

from core.logs import get_logger
from export.serve.protocol import SECURITY_HEADERS

log = get_logger("serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_SAFE_METHODS = frozenset({"GET", "HEAD"})


def host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.COM.' -> 'example.com'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    import ipaddress

    name = host_name(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(bind_host: str, extra: Iterable[str]) -> frozenset[str]:
    """The loopback names, the address bound where it is one host (not 0.0.0.0 or ::), and ``--allowed-host``."""
    names = {*LOOPBACK_HOSTS, *(host_name(h) for h in extra)}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(bind_host))
    return frozenset(names)


class HostAndOriginGuard:
    """Pure ASGI middleware (nothing buffered): see the module docstring."""

    def __init__(self, app, allowed_hosts: Iterable[str], cors_origins: Iterable[str]):
        self.app = app
        self.hosts = frozenset(allowed_hosts)
        self.origins = frozenset(o.rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin", "").rstrip("/").lower()
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            log.warning("refused Host %.80r (421): not an allowed host (--allowed-host)", host)
            return await _error(send, 421, f"host {host[:80]!r} is not served here: allowed hosts are "
                                           f"{', '.join(sorted(self.hosts))} (--allowed-host)")
        cors = origin in self.origins or "*" in self.origins
        cross = bool(origin) and origin not in (f"http://{host.lower()}", f"https://{host.lower()}")
        if cross and not cors and scope["method"] not in _SAFE_METHODS:
            log.warning("refused a %s from origin %.80r (403): not allowed (--cors-origin)", scope["method"], origin)
            return await _error(send, 403, f"cross-origin {scope['method']} from {origin[:80]!r} is not allowed "
                                           f"(--cors-origin)")
        if cross and cors and scope["method"] == "OPTIONS":
            return await _preflight(send, origin)
        extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")] if cross else []

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                added = [h for h in SECURITY_HEADERS if h[0] not in names] + extra
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "status": status}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


async def _preflight(send, origin: str) -> None:
    await send({"type": "http.response.start", "status": 204,
                "headers": [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                            (b"access-control-allow-methods", b"GET, POST"),
                            (b"access-control-allow-headers", b"Content-Type"),
                            (b"access-control-max-age", b"600"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": b""})
