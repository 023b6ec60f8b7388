"""Thread-safe request API over the engine: one background thread runs `step()` in a loop.

The server (or any caller) uses only this: `submit`, `abort`, `stats`. Outputs are
delivered through the callback given at submit, called from the engine thread; an
asyncio caller wraps it with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..config import SamplingParams
from .outputs import EngineStats, RequestOutput

if TYPE_CHECKING:
    from .llm_engine import LLMEngine

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


@dataclass(slots=True)
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: OutputCallback


class EngineRunner:
    """Owns the engine thread. All engine state is touched only by that thread."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Submit | tuple[str, str]] = queue.SimpleQueue()
        self._callbacks: dict[str, OutputCallback] = {}
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()
        self.fatal_error: BaseException | None = None

    # -- caller side (any thread) -------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="mtpserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; running requests are aborted and told so."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               on_output: OutputCallback) -> None:
        """Queue a request. Validation errors (prompt too long...) raise ValueError here."""
        self.engine.validate_request(prompt_token_ids, params)
        self._inbox.put(_Submit(request_id, list(prompt_token_ids), params, on_output))
        self._wakeup.set()

    def abort(self, request_id: str) -> None:
        """Abort a request; it is dropped within one step and its cache freed."""
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- engine thread -----------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Submit):
                try:
                    self.engine.add_request(item.request_id, item.prompt_token_ids, item.params)
                except ValueError as exc:
                    # Answer the submitter directly: a duplicate id must not hijack the
                    # callback of the request that owns it.
                    try:
                        item.on_output(RequestOutput(item.request_id, [], "", 0, 0, finished=True,
                                                     finish_reason="error", error=str(exc)))
                    except Exception:
                        log.exception("output callback for %s failed", item.request_id)
                    continue
                self._callbacks[item.request_id] = item.on_output
            else:
                for out in self.engine.abort_request(item[1]):
                    self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        cb = self._callbacks.get(out.request_id)
        if out.finished:
            self._callbacks.pop(out.request_id, None)
        if cb is None:
            return
        try:
            cb(out)
        except Exception:  # a broken consumer must not kill the engine
            log.exception("output callback for %s failed", out.request_id)

    def _deliver_error(self, request_id: str, message: str) -> None:
        self._deliver(RequestOutput(request_id, [], "", 0, 0, finished=True,
                                    finish_reason="error", error=message))

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
                self._stats = self.engine.stats()
        # Last line of defence: step() contains its own faults (failing that step's
        # requests), so this is a bug in that recovery or outside the step.
        except BaseException as exc:  # fail every request loudly, keep no zombies
            log.exception("engine loop crashed")
            self.fatal_error = exc
            for rid in list(self._callbacks):
                self._deliver_error(rid, f"engine failure: {exc}")
            return
        for rid in list(self._callbacks):
            for out in self.engine.abort_request(rid):
                self._deliver(out)
        self._stats = self.engine.stats()
