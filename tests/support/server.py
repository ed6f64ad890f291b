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
