"""Fixtures of the load-tester tests: the scripted OpenAI-compatible peer
(``scripted_peer.py``) served by uvicorn on a free loopback port in a thread."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pytest
import uvicorn

from scripted_peer import ServerState, make_app


@dataclass
class ScriptedServer:
    base_url: str
    state: ServerState


@pytest.fixture(scope="session")
def scripted_server() -> Iterator[ScriptedServer]:
    state = ServerState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(state), log_level="critical", lifespan="off",
                            timeout_graceful_shutdown=1, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("scripted server did not start")
        time.sleep(0.02)
    yield ScriptedServer(base_url=f"http://127.0.0.1:{port}", state=state)
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def server(scripted_server: ScriptedServer) -> ScriptedServer:
    """The session server with /metrics switched on."""
    scripted_server.state.metrics_enabled = True
    return scripted_server
