"""`create_app`: the FastAPI application built from the routes (routes.py) around a
`ServerState` (state.py), and its lifespan (load, serve, drain).

Lifecycle:
- startup: the lifespan returns at once so the port answers (503) while the engine loads
  in a background thread; `/health` turns 200 when the engine runner is started.
- shutdown (uvicorn's SIGTERM/SIGINT, see cli.py): the server turns *draining*: new
  requests and `/health` get 503; in-flight requests get up to `drain_timeout` seconds to
  finish (uvicorn's `timeout_graceful_shutdown` is set to the same value), then the runner
  is stopped (if this app created it) and whatever is left is aborted.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from .errors import install_error_handlers
from .middleware import BodySizeLimitMiddleware
from .routes import router
from .state import ServerSettings, ServerState

__all__ = ["GENERATION_ENDPOINTS", "ServerSettings", "ServerState", "create_app"]

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def create_app(source: Any, settings: ServerSettings | None = None, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the app.

    `source` is an `LLMEngine` (the app creates, starts and stops its runner), an already
    built `EngineRunner` (shared; the app starts it if needed but never stops it), an
    `EngineBackend` (engine_api.py; started and stopped by the app), or a zero-argument
    callable returning any of these, called on a background thread at startup so that the
    port answers 503 while the model loads.
    """
    settings = settings or ServerSettings()
    state = ServerState(settings, source, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(title="mtpserve", version="0.1.0", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mtp = state

    def on_error(request: Request, status: int) -> None:
        path = request.url.path
        if path in GENERATION_ENDPOINTS and not getattr(request.state, "metrics_recorded",
                                                        False):
            request.state.metrics_recorded = True
            state.metrics.record_request(path, status)

    def on_too_large(scope: dict) -> None:
        if scope.get("path") in GENERATION_ENDPOINTS:
            state.metrics.record_request(scope["path"], 413)

    install_error_handlers(app, on_error)
    app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes,
                       on_reject=on_too_large)
    return app
