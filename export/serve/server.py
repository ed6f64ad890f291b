"""Serve an exported captioning model over HTTP, with dynamic batching and a web page.

    python -m export.serve --model runs/demo/exported                    # http://127.0.0.1:8000/
    curl -F image=@photo.jpg http://127.0.0.1:8000/v1/captions
    curl -F image=@a.jpg -F image=@b.jpg 'http://127.0.0.1:8000/v1/captions?attention=1'
    curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/v1/captions
    curl http://127.0.0.1:8000/metrics

Concurrent requests are captioned together: up to --max-batch images in one beam search, waiting at most
--max-wait-ms for company (export/serve/batcher.py). The server binds 127.0.0.1 unless --host says otherwise; SIGTERM
or Ctrl-C stops taking connections, finishes the requests in flight, then exits. Routes: export/serve/app.py;
what clients may send and the error statuses: export/serve/inputs.py. Every connection and request is bounded (header
size, header and body deadlines, connections, upload bytes and pixels in flight, time from arrival) and only the
loopback names (and --allowed-host) are answered: export/serve/limits.py and docs/serving.md "Bounds".
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import fields

import torch

from core.cli import positive_float, positive_int
from core.images import release_image_memory_promptly
from core.logs import add_verbosity_args, get_logger, setup_logging
from export.runtime import add_model_args, check_decode_args, load_captioner, model_load_errors
from export.serve.app import ServeConfig, create_app
from export.serve.guards import is_loopback
from export.serve.limits import check_config, connection_limits
from export.serve.protocol import guarded_protocol

log = get_logger("serve")
FD_RESERVE = 64  # open files besides client connections: the model, the listening socket, logs, spooled uploads

def build_parser() -> argparse.ArgumentParser:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m export.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    add_model_args(p, beam_size=3)
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch, help="images per batch (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="longest wait for more images once one is queued (default 10)")
    p.add_argument("--queue-size", type=positive_int, default=d.queue_size,
                   help="images allowed to wait; more are answered 503 + Retry-After (default 256)")
    p.add_argument("--timeout-s", type=positive_float, default=d.timeout_s, help="per request; then 504 (default 30)")
    p.add_argument("--max-body-mb", type=positive_float, default=d.max_body_mb,
                   help="request body limit in MiB (default 20)")
    p.add_argument("--max-images", type=positive_int, default=d.max_images, help="images per request (default 16)")
    p.add_argument("--max-pixels", type=positive_int, default=d.max_pixels,
                   help="largest width x height decoded (default core.images.MAX_PIXELS)")
    p.add_argument("--decode-threads", type=positive_int, default=d.decode_threads,
                   help="threads decoding uploads (default 2)")
    p.add_argument("--max-request-pixels", type=positive_int, default=d.max_request_pixels,
                   help="pixels of all images of one request as they will decode (JPEGs at their reduced scale), "
                        "read from their headers before any decode; more: 413 (default core.images.MAX_PIXELS)")
    p.add_argument("--max-decode-pixels", type=positive_int, default=None,
                   help="pixels waiting for or in the decode threads, all requests together; more: 503 "
                        "(default twice MAX_PIXELS, at least --max-request-pixels)")
    p.add_argument("--max-inflight-mb", type=positive_float, default=None,
                   help="MiB of request bodies being received or held, all requests together; more: 503 "
                        "(default 128, at least --max-body-mb)")
    p.add_argument("--max-header-kb", type=positive_float, default=d.max_header_kb,
                   help="KiB of request line and headers; more: 431 and the connection is closed (default 32)")
    p.add_argument("--header-timeout-s", type=positive_float, default=d.header_timeout_s,
                   help="seconds for a request's headers to arrive; then 408 and close (default 10)")
    p.add_argument("--body-timeout-s", type=positive_float, default=d.body_timeout_s,
                   help="seconds for a request's body to arrive after its headers; then 408 and close (default 20)")
    p.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                   help="open connections; more are answered 503 and closed (default 128)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name to answer besides the loopback names and the address bound (repeat; '*': any); "
                        "other Host headers get 421")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (https://app.example) whose pages may POST here (repeat; '*': any); "
                        "cross-origin POSTs from others get 403")
    p.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    add_verbosity_args(p)
    return p

def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be 0 or more, got {args.max_wait_ms:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0..65535, got {args.port}")
    if args.max_inflight_mb is None:  # defaults that follow the per-request bounds they must hold
        args.max_inflight_mb = max(ServeConfig.max_inflight_mb, args.max_body_mb)
    if args.max_decode_pixels is None:
        args.max_decode_pixels = max(ServeConfig.max_decode_pixels, args.max_request_pixels)
    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if hasattr(args, f.name)}
    cfg = ServeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    check_config(cfg)
    return cfg

def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so port 0 is resolved and said in the log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # now: clients that connect once "serving on" is said wait in the backlog, not refused
    sock.set_inheritable(True)
    return sock

def warn_if_exposed(host: str) -> None:
    """Beyond loopback anyone who can reach the port may use the server: say so, and what to put in front."""
    if not is_loopback(host):
        log.warning("--host %s: the server is reachable from other machines, with no TLS and no authentication; "
                    "put a TLS proxy with authentication in front of it (docs/serving.md) and name the host it "
                    "is reached by with --allowed-host", host)


def fit_connections_to_fd_limit(max_connections: int) -> int:
    """--max-connections, lowered where the open-file limit (raised to its hard limit where possible) would run
    out first: past it accept() fails and no one is served."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("--max-connections %d lowered to %d: the open-file limit is %d", max_connections,
                    max(1, soft - FD_RESERVE), soft)
        return max(1, soft - FD_RESERVE)
    return max_connections


def _event_loop_runner():
    """uvloop's run where installed (its event loop costs less CPU per request than asyncio's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run

def serve(cfg: ServeConfig, captioner, sock: socket.socket) -> None:
    import uvicorn

    host, port = sock.getsockname()[:2]
    app = create_app(captioner, cfg)
    config = uvicorn.Config(app, log_level="warning", access_log=cfg.access_log, lifespan="on",
                            http=guarded_protocol(connection_limits(cfg)), timeout_keep_alive=5,
                            timeout_graceful_shutdown=cfg.timeout_s + 5)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    log.info("%s, beam %d, batches of up to %d (wait <= %g ms); serving on %s", captioner.backend.describe(),
             captioner.beam_size, cfg.max_batch, cfg.max_wait_ms, url)
    print(f"serving on {url}", file=sys.stderr, flush=True)  # the line tests and scripts wait for
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found: with these no-op
    # handlers a drained server exits 0 instead of dying of the signal it has already handled.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _event_loop_runner()(uvicorn.Server(config).serve(sockets=[sock]))
    log.info("stopped: requests in flight finished")

def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("serve", args.verbose - args.quiet)
    release_image_memory_promptly()  # decode threads: freed uploads leave the process (bounded peak memory)
    try:
        cfg = config_from_args(args)
        check_decode_args(args)  # a bad decoding flag is said as such, before the model loads
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warn_if_exposed(cfg.host)
    cfg.max_connections = fit_connections_to_fd_limit(cfg.max_connections)
    try:
        sock = bind(cfg.host, cfg.port)  # first: a taken port is said before the model takes seconds to load
    except OSError as e:
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        captioner = load_captioner(args)
        log.info("precision: %s; inference threads: %d", captioner.backend.precision, torch.get_num_threads())
    except model_load_errors() as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    serve(cfg, captioner, sock)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
