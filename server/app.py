"""`create_app`: the FastAPI application, its lifespan (load, serve, drain) and state.

Lifecycle:
- startup: the lifespan returns at once so the port answers (503) while the engine loads
  in a background thread; `/health` turns 200 when the engine runner is started.
- shutdown (uvicorn's SIGTERM/SIGINT, see cli.py): the server turns *draining*: new
  requests and `/health` get 503; in-flight requests get up to `drain_timeout` seconds to
  finish (uvicorn's `timeout_graceful_shutdown` is set to the same value), then the runner
  is stopped (if this app created it) and whatever is left is aborted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware

from mtpserve.decoding.engine.outputs import EngineStats
from mtpserve.decoding.engine.runner import EngineRunner

from .engine_api import EngineBackend, NativeBackend
from .engine_client import EngineClient
from .errors import UNAVAILABLE, APIError, install_error_handlers
from .metrics import ServerMetrics
from .middleware import BodySizeLimitMiddleware

log = logging.getLogger(__name__)

GENERATION_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(slots=True)
class ServerSettings:
    api_key: str | None = None  # None or "": no authentication
    max_queued: int = 64  # engine requests admitted beyond max_num_seqs before 429
    max_num_seqs: int | None = None  # None: the engine's config.max_num_seqs
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    served_model_name: str | None = None  # None: the engine's model_name
    max_tokens_limit: int | None = None  # largest max_tokens accepted; None: the context

    def __post_init__(self) -> None:
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must be >= 0")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise ValueError("max_tokens_limit must be >= 1")


Status = Literal["loading", "ready", "draining", "error"]


class ServerState:
    """Everything the routes need; lives on `app.state.mtp`."""

    def __init__(self, settings: ServerSettings, source: Any,
                 on_load_error: Callable[[BaseException], None] | None = None) -> None:
        self.settings = settings
        self.source = source
        self.on_load_error = on_load_error
        self.metrics = ServerMetrics(self._engine_stats)
        self.status: Status = "loading"
        self.load_error: BaseException | None = None
        self.engine: Any = None  # backend.engine: tokenizer, model_name, ...
        self.backend: EngineBackend | None = None
        self.runner: EngineRunner | None = None  # the native backend's runner
        self.client: EngineClient | None = None
        self.owns_runner = False
        self.model_name = settings.served_model_name or ""
        self.max_model_len = 0
        self.drain_deadline: float | None = None
        self.max_num_seqs = 0
        self.vocab_size = 0

    # -- lifecycle -------------------------------------------------------------------------
    def _build(self) -> tuple[EngineBackend, bool]:
        """Load (if given a factory) and start the backend. Runs on a worker thread."""
        src = self.source
        if not isinstance(src, (EngineRunner, EngineBackend)) \
                and not hasattr(src, "validate_request") and callable(src):
            src = src()
        if isinstance(src, EngineBackend):
            backend, owns = src, True
        else:  # an LLMEngine (owned) or a shared EngineRunner (not stopped here)
            backend = NativeBackend(src)
            owns = backend.owns_runner
        backend.start()
        return backend, owns

    def _ready(self, backend: EngineBackend, owns: bool) -> None:
        self.backend, self.owns_runner = backend, owns
        self.engine = backend.engine
        self.runner = getattr(backend, "runner", None)
        self.model_name = self.settings.served_model_name or backend.model_name
        self.max_model_len = int(backend.max_model_len)
        self.max_num_seqs = self.settings.max_num_seqs or backend.max_num_seqs
        self.vocab_size = int(getattr(backend.tokenizer, "vocab_size", 0) or 0)
        self.client = EngineClient(backend, self.max_num_seqs + self.settings.max_queued)
        if self.status == "loading":
            self.status = "ready"
        log.info("serving %s (max_model_len %d, capacity %d; %s)", self.model_name,
                 self.max_model_len, self.client.capacity, backend.describe())

    def _failed(self, exc: BaseException) -> None:
        self.load_error = exc
        if self.status == "loading":
            self.status = "error"
        log.error("engine failed to load: %s", exc)
        if self.on_load_error is not None:
            self.on_load_error(exc)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                built = self._build()
            except BaseException as exc:  # reported on /health and by on_load_error
                log.exception("loading the engine failed")
                loop.call_soon_threadsafe(self._failed, exc)
                return
            loop.call_soon_threadsafe(self._ready, *built)

        threading.Thread(target=load, name="mtpserve-load", daemon=True).start()

    def begin_drain(self) -> None:
        """Stop admitting requests; safe to call more than once (signal, then lifespan)."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout
            log.info("draining: %d request(s) in flight, up to %.1fs",
                     self.client.inflight if self.client else 0, self.settings.drain_timeout)
        self.status = "draining"

    async def shutdown(self) -> None:
        self.begin_drain()
        assert self.drain_deadline is not None
        if self.client is not None:
            remaining = self.drain_deadline - time.monotonic()
            if not await self.client.wait_idle(remaining):
                log.warning("drain timeout: aborting %d request(s)", self.client.inflight)
        if self.backend is not None and self.owns_runner:
            await asyncio.to_thread(self.backend.stop)

    # -- queries ---------------------------------------------------------------------------
    @property
    def max_tokens_limit(self) -> int:
        """The largest max_tokens a request may ask for (the context when not capped)."""
        cap = self.settings.max_tokens_limit
        return self.max_model_len if cap is None else min(cap, self.max_model_len)

    @property
    def max_seqs_per_request(self) -> int:
        """Engine sequences one request may ask for (prompts x n): the admission capacity,
        but never fewer than n's own maximum."""
        from .protocol import MAX_N

        return max(MAX_N, self.client.capacity if self.client is not None else MAX_N)

    def _engine_stats(self) -> EngineStats | None:
        return self.backend.stats() if self.backend is not None else None

    @property
    def healthy(self) -> bool:
        return (self.status == "ready" and self.backend is not None
                and self.backend.is_alive)

    def health_status(self) -> str:
        if self.status == "ready" and not self.healthy:
            return "error"
        return self.status

    def require_ready(self) -> EngineClient:
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly", UNAVAILABLE,
                           code="loading", headers={"Retry-After": "5"})
        if self.status == "draining":
            raise APIError(503, "the server is shutting down", UNAVAILABLE, code="draining")
        if self.status == "error" or not self.healthy or self.client is None:
            raise APIError(503, "the engine is not available", UNAVAILABLE,
                           code="engine_unavailable")
        return self.client


def create_app(source: Any, settings: ServerSettings | None = None, *,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """Build the app.

    `source` is an `LLMEngine` (the app creates, starts and stops its runner), an already
    built `EngineRunner` (shared; the app starts it if needed but never stops it), an
    `EngineBackend` (engine_api.py; started and stopped by the app), or a zero-argument
    callable returning any of these, called on a background thread at startup so that the
    port answers 503 while the model loads.
    """
    from .routes import router

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
