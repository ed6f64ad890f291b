"""The server's bounds in one place: ServeConfig's fields turned into the connection limits (export/serve/protocol.py),
the request intake's (export/serve/intake.py) and the Host/Origin guard (export/serve/guards.py), and the app's
handlers that keep every refusal in the server's own error format.

    install_limits(app, cfg)                     # in create_app, before the metrics middleware
    config = uvicorn.Config(app, http=guarded_protocol(connection_limits(cfg)), ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from export.serve.guards import HostAndOriginGuard, allowed_hosts_for
from export.serve.intake import IntakeConfig
from export.serve.protocol import ConnectionLimits

MIB = 2**20
ServeConfig = Any  # export.serve.app.ServeConfig (not imported: app imports this module)


def connection_limits(cfg: ServeConfig) -> ConnectionLimits:
    return ConnectionLimits(max_header_bytes=int(cfg.max_header_kb * 1024), header_timeout_s=cfg.header_timeout_s,
                            body_timeout_s=cfg.body_timeout_s, max_connections=cfg.max_connections)


def intake_config(cfg: ServeConfig) -> IntakeConfig:
    return IntakeConfig(timeout_s=cfg.timeout_s, max_body_bytes=int(cfg.max_body_mb * MIB), max_images=cfg.max_images,
                        max_pixels=cfg.max_pixels, max_request_pixels=cfg.max_request_pixels,
                        max_decode_pixels=cfg.max_decode_pixels, max_inflight_bytes=int(cfg.max_inflight_mb * MIB),
                        decode_threads=cfg.decode_threads)


def check_config(cfg: ServeConfig) -> None:
    """ValueError naming the flag for bounds that contradict each other."""
    if cfg.max_inflight_mb < cfg.max_body_mb:
        raise ValueError(f"--max-inflight-mb ({cfg.max_inflight_mb:g}) must be at least --max-body-mb "
                         f"({cfg.max_body_mb:g}): one upload of the largest size must fit")
    if cfg.max_decode_pixels < cfg.max_request_pixels:
        raise ValueError(f"--max-decode-pixels ({cfg.max_decode_pixels}) must be at least --max-request-pixels "
                         f"({cfg.max_request_pixels})")


def public_model_name(model: Path, text: str | None = None) -> str:
    """The model folder's name only, never its absolute path (GET /v1/model is readable by every client):
    ``text`` with any spelling of the path replaced by the name, or the name alone."""
    model = Path(model)
    if text is None:
        return model.name
    for spelling in sorted({str(model.resolve()), str(model.absolute()), str(model)}, key=len, reverse=True):
        text = text.replace(spelling, model.name)
    return text


def install_limits(app: FastAPI, cfg: ServeConfig) -> None:
    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer is {"detail": [...]}; every error of this server is {"error", "status"}
        problems = [f"{e.get('loc', ['?'])[0]} parameter {e.get('loc', ['', '?'])[-1]!r}: {e.get('msg', 'invalid')}"
                    for e in exc.errors()]
        return JSONResponse({"error": "; ".join(problems), "status": 422}, 422)

    app.add_middleware(HostAndOriginGuard, allowed_hosts=allowed_hosts_for(cfg.host, cfg.allowed_host),
                       cors_origins=cfg.cors_origin)
