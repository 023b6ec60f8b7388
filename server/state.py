"""The server's settings (`ServerSettings`) and per-app state (`ServerState`): the engine
backend's lifecycle (load on a worker thread, ready, drain, stop), the admission client
and what the routes ask of them.

Its own module so that the routes (routes.py), the request plumbing (serving.py) and the
OpenAPI document (openapi.py) can all depend on the state without importing app.py,
which builds the app from the routes: app -> routes -> state, never back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from mtpserve.decoding.engine.outputs import EngineStats
from mtpserve.decoding.engine.runner import EngineRunner

from .engine_api import EngineBackend, NativeBackend
from .engine_client import EngineClient
from .errors import UNAVAILABLE, APIError
from .metrics import ServerMetrics

log = logging.getLogger(__name__)


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
