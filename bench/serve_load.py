"""Load test of the caption server: N concurrent HTTP clients, dynamic batching vs --max-batch 1, same model, same run.

    python bench/serve_load.py --model /tmp/demo_native/exported          # 32 clients, 20 s per server setting
    ./launch.sh bench-serve --model runs/demo/exported --clients 32 --duration 20 --out bench/results/serve.md

For each setting (``--max-batch 16`` with ``--max-wait-ms``, then ``--max-batch 1``) one server
(``python -m export.serve``, 127.0.0.1, a free port) is started; ``--clients`` async clients (raw keep-alive HTTP/1.1
connections, light as wrk's) each send one image (multipart, the bytes curl -F sends), wait for its caption and send the next, for ``--warmup`` then ``--duration``
seconds. Only the requests that start and end inside the measured window count. Mean batch size comes from
the server's own /metrics (difference over the window). Clients and server share this machine's cores, as they
do with any loopback load test: the table names the CPU (core.hardware) and the client count.
Loopback only and bounded: at most 256 clients and 600 s per setting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import hardware  # noqa: E402
from export.serve.metrics import parse_histogram  # noqa: E402

MAX_CLIENTS, MAX_SECONDS = 256, 600


@dataclass
class LoadConfig:
    model: Path = ROOT / "runs" / "demo" / "exported"
    images: Path | None = None  # a folder of images; default: the demo data's, else a few synthetic ones
    clients: int = 32
    duration: float = 20.0  # measured seconds per setting
    warmup: float = 3.0
    beam_size: int = 3
    max_batch: int = 16
    max_wait_ms: float = 10.0
    threads: int | None = None  # server inference threads; None: the runtime's default
    backend: str = "ort"
    num_images: int = 16  # distinct images cycled through


@dataclass
class LoadResult:
    setting: str
    clients: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    batches: float = 0.0
    batched_images: float = 0.0
    server_cpu_s: float = 0.0  # CPU time the server process used in the window (all its threads)
    client_cpu_s: float = 0.0  # CPU time this process (the clients) used in the window: the same cores' other load

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.server_cpu_s / self.requests if self.requests else float("nan")

    @property
    def client_ms_per_request(self) -> float:
        return 1000 * self.client_cpu_s / self.requests if self.requests else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.batched_images / self.batches if self.batches else float("nan")


def image_files(cfg: LoadConfig) -> list[bytes]:
    folder = cfg.images or cfg.model.parent / "data" / "Images"
    if not folder.is_dir():
        from core.synthetic import generate

        folder = generate(Path(tempfile.mkdtemp(prefix="serve_load_")) / "data", cfg.num_images, seed=5) / "Images"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: cfg.num_images]
    if not files:
        raise SystemExit(f"error: no .jpg/.png images in {folder}")
    return [p.read_bytes() for p in files]


def start_server(cfg: LoadConfig, max_batch: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "export.serve", "--model", str(cfg.model), "--backend", cfg.backend, "--port", "0",
           "--beam-size", str(cfg.beam_size), "--max-batch", str(max_batch), "--max-wait-ms", str(cfg.max_wait_ms),
           "--queue-size", str(max(256, 4 * cfg.clients)), "--timeout-s", "120", "-q"]
    if cfg.threads:
        cmd += ["--threads", str(cfg.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        if line.startswith("serving on "):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # drained: a full pipe would block it
            return proc, line.split()[-1].rstrip("/")
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"error: the server did not start: {' '.join(cmd)}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def multipart_request(host: str, port: int, name: str, data: bytes) -> bytes:
    """One complete HTTP/1.1 request, the bytes ``curl -F image=@NAME`` sends, built once per image."""
    boundary = "sat-load-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection, read the whole response; its status code."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next((int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:")), 0)
    await reader.readexactly(length)
    return int(head[0].split()[1])


async def _client(url: str, requests: list[bytes], k: int, window: list[float], res: LoadResult) -> None:
    # A raw keep-alive HTTP/1.1 connection with prebuilt requests, as wrk does: the clients share the server's
    # cores, and an HTTP library's per-request CPU (httpx: about 2.5 ms here) would be counted against both settings.
    host, port = url.split("//")[1].rsplit(":", 1)
    reader = writer = None
    i = k
    while time.monotonic() < window[1]:
        request = requests[i % len(requests)]
        i += 1
        t0 = time.monotonic()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, int(port))
            ok = await _exchange(reader, writer, request) == 200
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            ok, writer = False, None  # a failed request is counted; the next one reconnects
        t1 = time.monotonic()
        if t0 >= window[0] and t1 <= window[1]:
            res.requests += ok
            res.errors += not ok
            if ok:
                res.latencies.append(t1 - t0)
    if writer is not None:
        writer.close()


async def _batch_counters(http, url: str) -> tuple[float, float]:
    return parse_histogram((await http.get(f"{url}/metrics")).text, "sat_batch_size")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def drive(url: str, pid: int, cfg: LoadConfig, images: list[bytes], setting: str) -> LoadResult:
    import httpx

    res = LoadResult(setting, cfg.clients)
    limits = httpx.Limits(max_connections=cfg.clients + 2, max_keepalive_connections=cfg.clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=180, trust_env=False) as http:
        now = time.monotonic()
        window = [now + cfg.warmup, now + cfg.warmup + cfg.duration]
        host, port = url.split("//")[1].rsplit(":", 1)
        requests = [multipart_request(host, int(port), f"{i}.jpg", data) for i, data in enumerate(images)]
        clients = [asyncio.create_task(_client(url, requests, k, window, res)) for k in range(cfg.clients)]
        await asyncio.sleep(max(0.0, window[0] - time.monotonic()))
        before, cpu0, own0 = await _batch_counters(http, url), cpu_seconds(pid), cpu_seconds(os.getpid())
        await asyncio.sleep(max(0.0, window[1] - time.monotonic()))
        after, cpu1, own1 = await _batch_counters(http, url), cpu_seconds(pid), cpu_seconds(os.getpid())
        await asyncio.gather(*clients)
    res.seconds = cfg.duration
    res.batches, res.batched_images = after[0] - before[0], after[1] - before[1]
    res.server_cpu_s, res.client_cpu_s = cpu1 - cpu0, own1 - own0
    return res


def run_setting(cfg: LoadConfig, images: list[bytes], max_batch: int) -> LoadResult:
    setting = f"--max-batch {max_batch}" + (f" --max-wait-ms {cfg.max_wait_ms:g}" if max_batch > 1 else "")
    proc, url = start_server(cfg, max_batch)
    try:
        print(f"[serve-load] {setting}: {cfg.clients} clients, {cfg.warmup:g} s warm-up + {cfg.duration:g} s "
              f"against {url}", file=sys.stderr, flush=True)
        return asyncio.run(drive(url, proc.pid, cfg, images, setting))
    finally:
        stop_server(proc)


def table(cfg: LoadConfig, results: list[LoadResult]) -> str:
    hw = hardware.detect()
    lines = [f"Caption server under load: {cfg.clients} concurrent clients, {cfg.duration:g} s measured per setting "
             f"({cfg.warmup:g} s warm-up), beam {cfg.beam_size}, backend {cfg.backend}, model {cfg.model}",
             f"CPU: {hardware.capability_tag(hw)} ({hardware.summary(hw)}); {os.cpu_count()} logical CPUs shared by "
             f"server and clients", "",
             "| server setting | requests/s | p50 ms | p95 ms | p99 ms | mean batch | server CPU ms/request "
             "| client CPU ms/request | requests | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.setting} | {r.rps:.1f} | {1000 * r.percentile(50):.0f} | {1000 * r.percentile(95):.0f} "
                     f"| {1000 * r.percentile(99):.0f} | {r.mean_batch:.2f} | {r.cpu_ms_per_request:.1f} "
                     f"| {r.client_ms_per_request:.1f} | {r.requests} "
                     f"| {r.errors} |")
    if len(results) == 2 and results[1].rps:
        dyn, one = results
        lines += ["", f"Dynamic batching: {dyn.rps / one.rps:.2f}x the requests/s of --max-batch 1 (target >= 3x); "
                      f"p99 {1000 * dyn.percentile(99):.0f} ms vs {1000 * one.percentile(99):.0f} ms "
                      f"({'no worse' if dyn.percentile(99) <= one.percentile(99) else 'WORSE'})."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = LoadConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=d.model, help="export directory (default runs/demo/exported)")
    p.add_argument("--images", type=Path, default=None, help="folder of .jpg/.png images to send")
    p.add_argument("--clients", type=int, default=d.clients, help="concurrent clients (default 32)")
    p.add_argument("--duration", type=float, default=d.duration, help="measured seconds per setting (default 20)")
    p.add_argument("--warmup", type=float, default=d.warmup, help="seconds before measuring (default 3)")
    p.add_argument("--beam-size", type=int, default=d.beam_size)
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="the batching setting (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    p.add_argument("--threads", type=int, default=None, help="server inference threads")
    p.add_argument("--backend", choices=["ort", "torchscript", "eager"], default=d.backend)
    p.add_argument("--only", choices=["batched", "single"], default=None, help="run one setting only")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (and a .json beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_SECONDS or not 0 <= args.warmup <= 60:
        print(f"error: --clients 1..{MAX_CLIENTS}, --duration (0, {MAX_SECONDS}], --warmup 0..60", file=sys.stderr)
        return 2
    if not (args.model / "manifest.json").is_file():
        print(f"error: {args.model} is not an export directory (no manifest.json); run ./launch.sh demo or "
              f"export/to_onnx.py first", file=sys.stderr)
        return 2
    cfg = LoadConfig(**{k: v for k, v in vars(args).items() if k in LoadConfig.__dataclass_fields__})
    images = image_files(cfg)
    sizes = {"batched": [cfg.max_batch], "single": [1], None: [cfg.max_batch, 1]}[args.only]
    results = [run_setting(cfg, images, b) for b in sizes]
    text = table(cfg, results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
        rows = [{**asdict(r), "latencies": None, "rps": r.rps, "p50": r.percentile(50), "p95": r.percentile(95),
                 "p99": r.percentile(99), "mean_batch": r.mean_batch, "cpu_ms_per_request": r.cpu_ms_per_request} for r in results]
        args.out.with_suffix(".json").write_text(json.dumps({"config": {k: str(v) for k, v in asdict(cfg).items()},
                                                             "results": rows}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
