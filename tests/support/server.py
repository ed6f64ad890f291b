"""Shared set-up for the server tests (no tests here): a real ``python -m export.serve`` on 127.0.0.1.

``Server`` starts the command line as a subprocess on a free port (``--port 0``; the port is read from its
``serving on URL`` line) and stops it with SIGTERM, as an operator would. Its stderr is collected by a thread
(a full pipe would block the server) and shown when something fails. Images for the requests are made here
with Pillow, in memory.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

from PIL import Image
from tests.support.export_artifacts import PYTHON, ROOT

START_TIMEOUT_S = 120


class Server:
    def __init__(self, export_dir: Path, *flags: str):
        cmd = [PYTHON, "-m", "export.serve", "--model", str(export_dir), "--port", "0", "--threads", "1", *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = self._wait_for_url(cmd)
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _wait_for_url(self, cmd) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("serving on "):
                return line.split()[-1].rstrip("/")
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError(f"server did not start: {' '.join(cmd)}\n{''.join(self.lines)}")

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


# ---------------------------------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (CRC fixed): decoding it would take ~10 GB."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def grey_png(width: int, height: int) -> bytes:
    """A valid all-black grey PNG of width x height, made without Pillow (a few KB for many megapixels: the bytes a
    decompression-heavy upload costs the client, against seconds of decoding on the server)."""
    rows = zlib.compress((b"\x00" + bytes(width)) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- raw HTTP
def metric(url: str, name: str) -> float:
    """The value of one series of the server's /metrics, ``name`` with its labels as Prometheus writes them
    (e.g. ``sat_requests_total{status="499"}``); 0 when absent."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def connect(url: str, timeout: float = 10) -> socket.socket:
    """A plain TCP connection to the server of ``url`` (for requests an HTTP library would not send)."""
    host, port = url.split("//")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the one response on ``sock``, read until the server closes (0 if it closed first
    without a response). The socket's timeout bounds every wait."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def vm_hwm_mib(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM over from the current RSS (Linux: 5 into clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
