"""Bridge between the engine thread (`EngineRunner`) and asyncio.

Each submitted group of engine requests (the n choices x prompts of one HTTP request)
gets one asyncio.Queue; the runner's callback, called on the engine thread, hands every
output delta to it with `loop.call_soon_threadsafe`. Closing a stream early (client
disconnect, cancellation, an exception) aborts its unfinished engine requests.

Admission is bounded: at most `capacity` (= max_num_seqs + max_queued) engine requests in
flight; beyond that `submit` raises `QueueFull` (HTTP 429).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, AsyncIterator, Sequence

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import RequestOutput, SpecStats

if TYPE_CHECKING:
    from mtpserve.decoding.engine.runner import EngineRunner

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests in flight than the server admits (running + queued)."""


class EngineUnavailable(Exception):
    """The engine thread is not running (crashed or stopped)."""


def _copy_spec(spec: SpecStats) -> SpecStats:
    return replace(spec, accepted_per_position=list(spec.accepted_per_position),
                   drafted_per_position=list(spec.drafted_per_position),
                   acceptance_histogram=list(spec.acceptance_histogram))


class RequestStream:
    """Outputs of the engine requests submitted together; iterate, then `close()`.

    Yields `(index, RequestOutput, t)`: the choice index, the delta, and the monotonic
    time at which the engine thread delivered it. Iteration ends when every request has
    finished. `close()` is idempotent and aborts whatever has not finished.
    """

    def __init__(self, client: "EngineClient", request_ids: list[str],
                 queue: asyncio.Queue) -> None:
        self._client = client
        self.request_ids = request_ids
        self._queue = queue
        self._unfinished = set(range(len(request_ids)))
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput, float]:
        if not self._unfinished:
            self.close()
            raise StopAsyncIteration
        index, out, t = await self._queue.get()
        if out.finished:
            self._unfinished.discard(index)
        return index, out, t

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for index in sorted(self._unfinished):
            self._client.runner.abort(self.request_ids[index])
        if self._unfinished:
            log.info("aborted %d unfinished request(s) of %s", len(self._unfinished),
                     self.request_ids[0].rsplit("-", 1)[0])
        self._client._release(len(self.request_ids))

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EngineClient:
    def __init__(self, runner: "EngineRunner", capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.runner = runner
        self.capacity = capacity
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- admission ------------------------------------------------------------------------
    def _admit(self, k: int) -> None:
        # a single request larger than the capacity is admitted when nothing else runs,
        # so that n <= 8 never becomes a permanent 429
        if self.inflight > 0 and self.inflight + k > self.capacity:
            raise QueueFull(
                f"server is at capacity ({self.inflight} requests in flight, limit "
                f"{self.capacity}); retry later")
        self.inflight += k
        self._idle.clear()

    def _release(self, k: int) -> None:
        self.inflight = max(0, self.inflight - k)
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False on timeout."""
        if timeout <= 0:
            return self.inflight == 0
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return self.inflight == 0
        return True

    # -- submission ------------------------------------------------------------------------
    def submit(self, requests: Sequence[tuple[list[int], SamplingParams]],
               request_id: str | None = None) -> RequestStream:
        """Admit and submit all requests at once, or none.

        Raises QueueFull (429), EngineUnavailable (503) or ValueError from the engine's
        validation (400). Must be called on the event loop thread.
        """
        if not requests:
            raise ValueError("nothing to generate")
        if not self.runner.is_alive:
            raise EngineUnavailable("the engine is not running")
        self._admit(len(requests))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        base = request_id or uuid.uuid4().hex
        ids = [f"{base}-{i}" for i in range(len(requests))]
        submitted: list[str] = []
        try:
            for i, (prompt_ids, params) in enumerate(requests):
                self.runner.submit(ids[i], prompt_ids, params, self._callback(loop, queue, i))
                submitted.append(ids[i])
        except BaseException:
            for rid in submitted:
                self.runner.abort(rid)
            self._release(len(requests))
            raise
        return RequestStream(self, ids, queue)

    @staticmethod
    def _callback(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        def on_output(out: RequestOutput) -> None:  # engine thread
            t = time.monotonic()
            if out.spec is not None:
                out.spec = _copy_spec(out.spec)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, out, t))
            except RuntimeError:  # event loop closed: nobody is listening any more
                pass
        return on_output

    async def generate(self, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One engine request as an async iterator of deltas; aborts if closed early."""
        stream = self.submit([(prompt_ids, params)])
        try:
            async for _, out, _ in stream:
                yield out
        finally:
            stream.close()
