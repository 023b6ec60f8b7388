"""Helpers for the server tests: a uvicorn server in a thread, SSE parsing, scraping."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn


class ServerThread:
    """A uvicorn server in a background thread (no signal handlers), on a free port."""

    def __init__(self, app: Any, drain_timeout: float = 5.0) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=drain_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        try:
            asyncio.run(serve())
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc

    def num_tasks(self) -> int:
        """asyncio tasks alive on the server's event loop (this query excluded)."""
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1

        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(10)

    @property
    def state(self):
        return self.app.state.mtp

    def start(self, wait_healthy: bool = True, timeout: float = 120.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self.thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.error}")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.02)
        if wait_healthy:
            while httpx.get(self.url + "/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise TimeoutError("server did not become healthy")
                time.sleep(0.05)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for servers started in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_direct(runner, prompt_ids: list[int], params, timeout: float = 120.0):
    """Generate through the engine runner directly (no HTTP): (text, token ids, last output)."""
    import queue
    import uuid

    q: queue.Queue = queue.Queue()
    runner.submit(f"direct-{uuid.uuid4().hex}", prompt_ids, params, q.put)
    text, ids = "", []
    while True:
        out = q.get(timeout=timeout)
        text += out.new_text
        ids.extend(out.new_token_ids)
        if out.finished:
            return text, ids, out


def sse_events(response) -> list:
    """Parse an httpx streaming response into JSON events (and the string "[DONE]")."""
    import json

    events = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def scrape(url: str) -> dict:
    """/metrics as {(sample name, sorted label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_idle(url: str, timeout: float = 30.0) -> float:
    """Wait until the engine reports no running or waiting request; returns seconds waited."""
    t0 = time.monotonic()
    while True:
        m = scrape(url)
        if m[("mtpserve_num_requests_running", ())] == 0 and \
                m[("mtpserve_num_requests_waiting", ())] == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"engine still busy after {timeout}s")
        time.sleep(0.1)
