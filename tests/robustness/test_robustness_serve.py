"""The caption server's bounds against hostile or careless clients: a real ``python -m export.serve`` on loopback.

Each test has its own deadline (socket timeouts, ``timeout=`` of every request), so a regression fails in seconds
instead of hanging: a huge header gets 431 at once while another client is served; slow or silent connections are
closed within their deadline (408); pixel-heavy requests are refused (413, 503) or cut at --timeout-s (504) while a
small request is answered; 100 concurrent uploads stay under a stated peak RSS; clients that leave are counted as
499 with one log line and no traceback; SIGTERM with slow uploads and a full connection table ends at once; only the
allowed hosts and origins are answered, with the security headers. One server serves all but the last two tests.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from tests.support.export_artifacts import artifacts
from tests.support.server import (Server, connect, grey_png, metric, read_response, reset_peak_rss,
                                  vm_hwm_mib)

TIMEOUT_S = 2.0  # --timeout-s
HEADER_S = BODY_S = 1.5  # --header-timeout-s, --body-timeout-s
HEAVY = (5000, 5000)  # one heavy image: 25 Mpx of grey PNG, ~20 KB to send, ~0.7 s to decode (Zen 3)
FLAGS = ["--beam-size", "1", "--max-wait-ms", "5", "--timeout-s", str(TIMEOUT_S), "--max-header-kb", "16",
         "--header-timeout-s", str(HEADER_S), "--body-timeout-s", str(BODY_S), "--decode-threads", "1",
         "--max-pixels", "26000000", "--max-request-pixels", "100000000", "--max-decode-pixels", "100000000",
         "--max-body-mb", "2.5", "--max-inflight-mb", "8", "--cors-origin", "http://app.example"]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def server(art):
    srv = Server(art.export_dir, *FLAGS)
    yield srv
    assert srv.terminate() == 0, srv.log
    assert "Traceback" not in srv.log and "Exception in ASGI application" not in srv.log, srv.log


@pytest.fixture(scope="module")
def small(art) -> bytes:
    return art.image_paths[0].read_bytes()


def caption(url: str, *images: bytes, timeout: float = 10, **kw) -> httpx.Response:
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/v1/captions", files=files, timeout=timeout, **kw)


def test_huge_header_gets_431_at_once_while_another_client_is_served(server, small):
    got: dict = {}

    def attacker():
        sock = connect(server.url, timeout=5)
        t0 = time.monotonic()
        try:  # 1 MiB of one header, never finished; the server answers once 16 KiB have come
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2**20)
        except OSError:
            pass  # the server closed while it was still sending: the answer was written first
        got["status"], _, got["body"] = read_response(sock)
        got["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=attacker)
    thread.start()
    other = caption(server.url, small, timeout=5)  # served meanwhile
    thread.join(timeout=10)
    assert other.status_code == 200, other.text
    assert got["status"] == 431 and b"--max-header-kb" in got["body"], got
    assert got["seconds"] < 2, got


def test_slow_or_silent_connections_are_closed_within_their_deadline(server):
    silent, slow_head, slow_body = (connect(server.url, timeout=HEADER_S + 3) for _ in range(3))
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
    slow_body.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 1000\r\n\r\nabc")
    t0 = time.monotonic()
    for _ in range(5):  # a byte every 0.2 s keeps neither alive past its deadline
        time.sleep(0.2)
        for sock in (slow_head, slow_body):
            try:
                sock.send(b"a")
            except OSError:
                pass
    answers = [read_response(s) for s in (silent, slow_head, slow_body)]
    seconds = time.monotonic() - t0
    assert answers[0][0] == 0  # sent nothing: closed without an answer
    assert answers[1][0] == 408 and b"--header-timeout-s" in answers[1][2], answers[1]
    assert answers[2][0] == 408 and b"--body-timeout-s" in answers[2][2], answers[2]
    assert seconds < max(HEADER_S, BODY_S) + 1.5, seconds
    assert metric(server.url, 'sat_requests_total{status="408"}') >= 1  # the app counted the body it was reading


def test_pixel_heavy_requests_get_503_or_504_within_timeout_while_a_small_one_is_answered(server, small):
    heavy = [grey_png(*HEAVY)] * 4  # 100 Mpx: the whole --max-decode-pixels, ~3 s of decoding (Zen 3)

    async def scenario():
        async with httpx.AsyncClient(timeout=TIMEOUT_S + 3) as client:
            async def timed(images, delay=0.0):
                await asyncio.sleep(delay)
                files = [("image", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
                t0 = time.monotonic()
                r = await client.post(f"{server.url}/v1/captions", files=files)
                return r, time.monotonic() - t0

            return await asyncio.gather(*(timed(heavy) for _ in range(4)), timed(heavy * 2),
                                        timed([small], delay=0.3))

    *heavies, too_big, light = asyncio.run(scenario())
    statuses = [r.status_code for r, _ in heavies]
    assert set(statuses) <= {200, 503, 504} and 503 in statuses, [r.text for r, _ in heavies]
    assert all(s <= TIMEOUT_S + 1 for _, s in heavies), [s for _, s in heavies]
    assert too_big[0].status_code == 413 and "--max-request-pixels" in too_big[0].json()["error"]
    assert light[0].status_code == 200, light[0].text  # decoded beside the heavy ones, not behind them
    assert light[1] < TIMEOUT_S


def test_hundred_concurrent_uploads_stay_under_a_stated_peak(server, small):
    """100 concurrent 2.4 MiB uploads (240 MiB in all) with --max-inflight-mb 8: the server's peak RSS grows by
    less than 64 MiB; every client gets 200 or 503 (or its connection closed after the 503)."""
    body = small + bytes(int(2.4 * 2**20) - len(small))  # a real image, padded (decoders stop at its end)
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    reset_peak_rss(server.proc.pid)
    before = vm_hwm_mib(server.proc.pid)

    def upload() -> int:
        sock = connect(server.url, timeout=15)
        try:
            sock.sendall(head + body)
        except OSError:
            pass
        return read_response(sock)[0]

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(lambda _: upload(), range(100)))
    grew = vm_hwm_mib(server.proc.pid) - before
    assert set(statuses) <= {200, 503, 504, 0} and statuses.count(200) >= 1, statuses
    assert grew < 64, f"peak RSS grew by {grew:.0f} MiB"


def test_clients_that_leave_are_counted_499_with_one_line_and_no_traceback(server, small):
    images_before = metric(server.url, "sat_images_total")
    for _ in range(3):  # mid-upload: headers and part of the body, then gone
        sock = connect(server.url)
        sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 100000\r\n\r\n" + small[:500])
        sock.close()
    files = b"".join(  # after sending: its images take seconds to decode, it leaves at 0.3 s
        b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"g.png\"\r\nContent-Type: image/png\r\n"
        b"\r\n" + grey_png(*HEAVY) + b"\r\n" for _ in range(3)) + b"--b--\r\n"
    sock = connect(server.url)
    sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b"
                 b"\r\nContent-Length: " + str(len(files)).encode() + b"\r\n\r\n" + files)
    time.sleep(0.3)
    sock.close()
    deadline = time.monotonic() + 5
    while metric(server.url, 'sat_requests_total{status="499"}') < 4:
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    assert metric(server.url, "sat_images_total") == images_before  # none of their images was captioned
    assert len(re.findall(r"left .*\(499\)", server.log)) == 4, server.log
    assert "Traceback" not in server.log and "Exception in ASGI application" not in server.log, server.log


def test_only_allowed_hosts_and_origins_are_answered_with_security_headers(server, art, small):
    port = server.url.rsplit(":", 1)[1]
    rebound = httpx.get(f"{server.url}/v1/model", headers={"Host": f"attacker.example:{port}"}, timeout=5)
    assert rebound.status_code == 421 and "--allowed-host" in rebound.json()["error"], rebound.text
    info = httpx.get(f"{server.url}/v1/model", headers={"Host": f"localhost:{port}"}, timeout=5)
    assert info.status_code == 200 and info.json()["model"] == art.export_dir.name
    assert str(art.export_dir.parent) not in info.text  # no absolute path
    images = metric(server.url, "sat_images_total")
    cross = caption(server.url, small, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403 and "--cors-origin" in cross.json()["error"], cross.text
    assert metric(server.url, "sat_images_total") == images  # refused before any work
    same = caption(server.url, small, headers={"Origin": server.url})
    allowed = caption(server.url, small, headers={"Origin": "http://app.example"})
    assert same.status_code == 200 and allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "http://app.example"
    preflight = httpx.options(f"{server.url}/v1/captions", headers={"Origin": "http://app.example"}, timeout=5)
    assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
    for r in (rebound, info, cross, httpx.get(f"{server.url}/", timeout=5)):
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    maybe = httpx.post(f"{server.url}/v1/captions?attention=maybe", files={"image": ("a.jpg", small)}, timeout=5)
    assert maybe.status_code == 422 and set(maybe.json()) == {"error", "status"}, maybe.text
    assert "attention" in maybe.json()["error"]


def test_non_loopback_bind_warns(tmp_path, capsys):
    from export.serve import server as serve_command  # in process: the command's own main(), torch already loaded

    assert serve_command.main(["--model", str(tmp_path / "none"), "--host", "0.0.0.0", "--port", "0", "-q"]) == 2
    err = capsys.readouterr().err  # no model there: it stops after the warning and the bind
    assert "reachable from other machines" in err and "TLS proxy" in err, err


def test_sigterm_with_slow_uploads_and_a_full_connection_table_ends_at_once(art, small):
    srv = Server(art.export_dir, "--max-connections", "4", "--header-timeout-s", "60", "--body-timeout-s", "60")
    try:
        slow = [connect(srv.url, timeout=10) for _ in range(3)]
        for sock in slow:  # headers done, the body never comes
            sock.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: 100000\r\n\r\n" + small[:100])
        idle = connect(srv.url, timeout=10)
        time.sleep(0.3)
        extra = connect(srv.url, timeout=10)  # the fifth: over --max-connections
        status, headers, body = read_response(extra)
        assert status == 503 and b"--max-connections" in body and headers.get("retry-after") == "1", body
        t0 = time.monotonic()
        code = srv.terminate(timeout=20)
        seconds = time.monotonic() - t0
        answers = [read_response(sock)[0] for sock in slow]
        assert read_response(idle)[0] == 0
    finally:
        srv.terminate()
    assert code == 0 and seconds < 5, (code, seconds, srv.log)
    assert answers == [503] * 3, answers
    assert "Traceback" not in srv.log and "CancelledError" not in srv.log, srv.log
