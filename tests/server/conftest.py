"""Real uvicorn servers on loopback ports, all sharing ONE engine runner.

The engine is the session's `default_engine` (loaded once). `shared_runner`, the engine
thread over it, is module-scoped: it is stopped at the end of each test module, so no
runner thread is left stepping the engine when other tests use `default_engine` directly
(directories without `__init__.py` make pytest's "package" scope last the whole session).
Every app built here gets the runner, not the engine, so no app starts or stops a second
engine thread.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from mtpserve.server.app import ServerSettings, create_app
from server_helpers import ServerThread


@pytest.fixture(scope="module")
def shared_runner(default_engine):
    from mtpserve.decoding.engine.runner import EngineRunner

    runner = EngineRunner(default_engine)
    runner.start()
    yield runner
    runner.stop()


@pytest.fixture(scope="module")
def make_server(shared_runner) -> Callable[..., ServerThread]:
    """Start another app on the shared runner: make_server(ServerSettings(...))."""
    servers: list[ServerThread] = []

    def make(settings: ServerSettings | None = None, source: Any = None,
             wait_healthy: bool = True, drain_timeout: float = 5.0) -> ServerThread:
        app = create_app(source if source is not None else shared_runner,
                         settings or ServerSettings())
        srv = ServerThread(app, drain_timeout).start(wait_healthy=wait_healthy)
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="module")
def server(make_server) -> ServerThread:
    return make_server(ServerSettings())


@pytest.fixture(scope="module")
def server_url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return server.state.model_name

