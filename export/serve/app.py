"""The FastAPI app of the caption server: routes, dynamic batching of the beam search, metrics, the web page.

    app = create_app(captioner, ServeConfig(model=Path("exported")))   # served by export/serve/server.py (uvicorn)

    POST /v1/captions[?attention=1]  multipart 'image' file fields, or one raw image body -> {"results": [...]}
         decoding controls as query parameters (docs/decoding.md): sample_method, temperature, top_k, top_p,
         sample_n, seed, beam_groups, diversity, block_trigrams, bad_endings (within DECODE_LIMITS)
    GET  /                           the web page (export/serve/static/index.html, self-contained)
    GET  /healthz  GET /v1/model  GET /metrics

Every image of every concurrent request goes through one DynamicBatcher (export/serve/batcher.py) whose worker thread
runs ``Captioner.caption_tensors`` on up to ``max_batch`` images at once: the same beam search, on the same
preprocessed tensors, as ``python -m export.caption``.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from core.decode import Hypothesis
from core.images import MAX_PIXELS
from export.serve.batcher import BatcherConfig, DynamicBatcher, QueueFull, Stopped
from export.runtime import Captioner, decode_controls
from export.serve.inputs import Problem
from export.serve.intake import Intake
from export.serve.limits import install_limits, intake_config, public_model_name
from export.serve.metrics import ServeMetrics

STATIC = Path(__file__).resolve().parent / "static"
# The page runs only its own inline script and style and sends only to this server: nothing from the network.
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
ENDPOINTS = ("/", "/healthz", "/v1/model", "/v1/captions", "/metrics")
# Query parameters of the decoding controls: (type, low, high). A request's controls cost at most sample_n rows
# (or the server's beam) per image, so the server's own limits bound the work.
DECODE_LIMITS: dict[str, tuple[type, float, float]] = {
    "sample_method": (str, 0, 0), "temperature": (float, 0.05, 10.0), "top_k": (int, 1, 1000),
    "top_p": (float, 0.01, 1.0), "sample_n": (int, 1, 10), "seed": (int, 0, 2**31 - 1),
    "beam_groups": (int, 1, 16), "diversity": (float, 0.0, 100.0), "block_trigrams": (bool, 0, 1),
    "bad_endings": (str, 0, 0),
}


@dataclass
class ServeConfig:
    model: Path = Path("exported")  # shown by GET /v1/model; loading it is export.runtime.load_captioner's
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000  # 0: any free port (the log line says which)
    max_batch: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 256  # images waiting; more get 503 + Retry-After
    timeout_s: float = 30.0  # per request: 504 after this
    max_body_mb: float = 20.0
    max_images: int = 16  # per request
    max_pixels: int = MAX_PIXELS
    decode_threads: int = 2  # image decoding, off the event loop
    access_log: bool = False
    # the bounds of export/serve/limits.py: connections, admission, whom the server answers
    max_request_pixels: int = MAX_PIXELS  # all images of one request, as they will decode: 413 over
    max_decode_pixels: int = 2 * MAX_PIXELS  # all images waiting for or in the decode threads: 503 over
    max_inflight_mb: float = 128.0  # request bodies being received or held: 503 over
    max_header_kb: float = 32.0  # request line + headers: 431 over
    header_timeout_s: float = 10.0  # 408 after
    body_timeout_s: float = 20.0  # 408 after
    max_connections: int = 128  # open connections: 503 beyond
    allowed_host: tuple[str, ...] = ()  # besides the loopback names (and the address bound)
    cors_origin: tuple[str, ...] = ()  # origins whose pages may POST

    @property
    def batcher(self) -> BatcherConfig:
        return BatcherConfig(self.max_batch, self.max_wait_ms, self.queue_size)


def hypothesis_json(captioner: Captioner, hyp: Hypothesis, attention: bool) -> dict[str, Any]:
    """One image's result: the caption as export.caption prints it, its score, words and ids, maybe attention."""
    words = captioner.vocab.decode_tokens(hyp.tokens)
    out: dict[str, Any] = {"caption": " ".join(words), "score": round(float(hyp.score), 6), "tokens": words,
                           "token_ids": [int(t) for t in hyp.tokens]}
    if attention:
        alphas = captioner.word_alphas(hyp, words).float()  # (words, P)
        side = int(round(math.sqrt(alphas.shape[1]))) if alphas.numel() else 0
        out["attention"] = {"grid": [side, side],
                            "maps": [[round(float(a), 5) for a in row] for row in alphas.tolist()]}
    return out


def results_json(captioner: Captioner, hyps: list[Hypothesis], attention: bool) -> dict[str, Any]:
    """The first caption's result; with several (sample_n, beam_groups), all of them under "captions"."""
    out = hypothesis_json(captioner, hyps[0], attention)
    if len(hyps) > 1:
        out["captions"] = [{"caption": captioner.vocab.decode(h.tokens), "score": round(float(h.score), 6)}
                           for h in hyps]
    return out


def model_info(captioner: Captioner, cfg: ServeConfig) -> dict[str, Any]:
    """GET /v1/model: what the manifest says, and how this server runs it."""
    backend = captioner.backend
    manifest = backend.manifest or {}
    choice = getattr(backend, "precision", None)  # a core.hardware.Choice set by load_backend
    providers = list(getattr(backend, "providers", None) or [str(backend.device)])
    return {"model": public_model_name(cfg.model), "backend": backend.name,
            "describe": public_model_name(cfg.model, backend.describe()),
            "providers": providers, "precision": str(choice.value) if choice else "fp32",
            "precision_reason": choice.reason if choice else None, "dims": manifest.get("dims", {}),
            "vocab_size": len(captioner.vocab), "image_size": backend.image_size,
            "preprocess": manifest.get("preprocess", backend.preprocess), "created": manifest.get("created"),
            "decode": {"beam_size": captioner.beam_size, "max_len": captioner.max_len,
                       "length_norm": captioner.length_norm, "search": captioner.search},
            "batching": asdict(cfg.batcher), "limits": {"max_body_mb": cfg.max_body_mb,
                                                        "max_images": cfg.max_images, "max_pixels": cfg.max_pixels,
                                                        "max_request_pixels": cfg.max_request_pixels,
                                                        "timeout_s": cfg.timeout_s}}


def _decode_value(name: str, raw: str) -> Any:
    kind, low, high = DECODE_LIMITS[name]
    if kind is str:
        return raw
    if kind is bool:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise Problem(400, f"query parameter {name}={raw!r}: expected true or false")
        return raw.lower() in ("1", "true", "yes", "on")
    try:
        value = kind(raw)
    except ValueError:
        raise Problem(400, f"query parameter {name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") \
            from None
    if not low <= value <= high:
        raise Problem(400, f"query parameter {name}={raw!r}: must be between {low:g} and {high:g}")
    return value


def decode_params(query, captioner: Captioner):
    """The request's decoding controls (None: the server's), each parameter within DECODE_LIMITS; a 400 names the
    bad one."""
    given = {k: _decode_value(k, v) for k, v in query.items() if k in DECODE_LIMITS}
    if not given:
        return None
    words = given.pop("bad_endings", None)  # absent: none; empty: the default list; else a comma-separated list
    bad = ([w for w in words.split(",") if w] or True) if words is not None else False
    if isinstance(bad, list) and len(bad) > 64:
        raise Problem(400, "query parameter bad_endings: at most 64 words")
    try:
        controls = decode_controls(captioner.vocab, bad_endings=bad, **given)
        if controls.beam_groups > 1 and captioner.beam_size % controls.beam_groups:
            raise ValueError(f"beam_groups must divide the server's beam size {captioner.beam_size}")
        if captioner.search == "tutorial" and (controls.sampling or controls.beam_groups > 1):
            raise ValueError("this server runs the tutorial search: it cannot sample or use beam groups")
    except ValueError as e:
        raise Problem(400, f"decoding controls: {e}") from None
    return controls


def seeded(controls, i: int):
    """Image i of a request with a sampling seed gets seed + i, and so its own search: the captions then depend on
    the seed and the image only, not on which other images the batcher put beside it."""
    if controls is None or controls.seed is None or not controls.sampling:
        return controls
    return replace(controls, seed=controls.seed + i)


class StatusMetrics:
    """Pure ASGI middleware: every HTTP response counted by status, timed by endpoint (no body buffering)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        self.metrics.in_flight.inc()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class CaptionService:
    """The batcher, the decode pool and the caption call of one app."""

    def __init__(self, captioner: Captioner, cfg: ServeConfig, metrics: ServeMetrics):
        self.captioner, self.cfg, self.metrics = captioner, cfg, metrics
        self.batcher = DynamicBatcher(self._run_batch, cfg.batcher, metrics.on_batch, metrics.on_depth)
        self.intake = Intake(intake_config(cfg), captioner.transform, captioner.image_size,
                             queue_room=lambda: cfg.queue_size - self.batcher.depth)

    def _run_batch(self, items: list[tuple[torch.Tensor, Any]]) -> list[list[Hypothesis]]:
        """(image, decoding controls) items -> the captions of each; one search per distinct controls."""
        out: list[list[Hypothesis]] = [[] for _ in items]
        groups: dict[Any, list[int]] = {}
        for i, (_, controls) in enumerate(items):
            groups.setdefault(controls, []).append(i)
        with torch.inference_mode():
            for controls, rows in groups.items():  # (N, 3, S, S) -> N lists of hypotheses
                for i, hyps in zip(rows, self.captioner.decode_tensors(torch.stack([items[i][0] for i in rows]),
                                                                       controls)):
                    out[i] = hyps
        return out

    async def caption(self, request: Request, attention: bool) -> dict[str, Any]:
        controls = decode_params(request.query_params, self.captioner)  # bad controls: 400 before the body is read
        # arrival to answer under --timeout-s; admission, body, decode: export/serve/intake.py
        return await self.intake.handle(request, lambda images: self._caption(images, attention, controls))

    async def _caption(self, images: list[torch.Tensor], attention: bool, controls) -> dict[str, Any]:
        cfg = self.cfg
        if self.batcher.depth + len(images) > cfg.queue_size:
            raise self._busy(f"{self.batcher.depth} images are waiting (--queue-size {cfg.queue_size})")
        try:  # the deadline: intake's
            hyps = await asyncio.gather(*(self.batcher.submit((x, seeded(controls, i))) for i, x in enumerate(images)))
        except QueueFull as e:
            raise self._busy(str(e)) from None
        except Stopped as e:
            raise Problem(503, str(e)) from None
        return {"results": [results_json(self.captioner, h, attention) for h in hyps]}

    def _busy(self, why: str) -> Problem:
        retry = max(1, math.ceil(self.cfg.max_wait_ms / 1000 + self.batcher.depth / max(self.cfg.max_batch, 1)))
        return Problem(503, f"server busy: {why}; retry later", {"Retry-After": str(retry)})


def _routes(app: FastAPI, service: CaptionService, info: dict[str, Any], page: str) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": service.batcher.depth}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return info

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @app.post("/v1/captions")
    async def captions(request: Request, attention: bool = False) -> dict[str, Any]:
        return await service.caption(request, attention)


def create_app(captioner: Captioner, cfg: ServeConfig) -> FastAPI:
    metrics = ServeMetrics()
    service = CaptionService(captioner, cfg, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        yield
        await service.batcher.stop()  # after uvicorn has let in-flight requests finish (SIGTERM drain)
        service.intake.shutdown()

    app = FastAPI(title="Show, Attend and Tell captions", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # the docs pages load scripts from a CDN: off

    @app.exception_handler(Problem)
    async def problem(request: Request, exc: Problem) -> JSONResponse:
        return JSONResponse({"error": exc.detail, "status": exc.status}, exc.status, headers=exc.headers)

    _routes(app, service, model_info(captioner, cfg), (STATIC / "index.html").read_text(encoding="utf-8"))
    install_limits(app, cfg)  # Host and Origin checks, security headers, query errors in the format above
    app.add_middleware(StatusMetrics, metrics=metrics)
    app.state.service = service
    return app
