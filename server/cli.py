"""`mtpserve` command line: `serve` (this package) plus the engine's offline commands
(`generate`, `bench`, `train-heads`, `inspect`) registered by `mtpserve.decoding.commands`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
from types import FrameType, ModuleType
from typing import Any, Callable

log = logging.getLogger("mtpserve.server")

API_KEY_ENV = "MTPSERVE_API_KEY"


def _commands() -> ModuleType | None:
    """The engine's command module, or None where this installation lacks it."""
    if importlib.util.find_spec("mtpserve.decoding.commands") is None:
        return None
    return importlib.import_module("mtpserve.decoding.commands")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; use 0.0.0.0 to listen on all, "
                        "preferably with --api-key)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: env "
                        f"{API_KEY_ENV}; unset: no authentication). /health and /metrics "
                        f"stay open")
    g.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models and accepted in requests "
                        "(default: the model's own name)")
    g.add_argument("--max-queued", type=int, default=64,
                   help="requests admitted beyond --max-num-seqs before answering 429 "
                        "(default 64)")
    g.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 "
                        "(default 1048576)")
    g.add_argument("--max-tokens-limit", type=int, default=None, metavar="N",
                   help="largest max_tokens a request may ask for; larger ones get 400 "
                        "(default: the context length)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM "
                        "before they are aborted; meanwhile the port stays open and new "
                        "requests get 503 (default 30)")
    g.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="allow cross-origin requests from these origins (default: CORS off)")
    g.add_argument("--log-prompts", action="store_true",
                   help="log prompt text (off by default: prompts are never logged)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="log level (default info)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtpserve",
        description="OpenAI-compatible inference server with self-speculative decoding.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve", help="run the OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                    "/metrics. SIGTERM drains in-flight requests, then exits 0.")
    add_serve_args(serve)
    serve.set_defaults(func=run_serve)
    commands = _commands()
    if commands is not None:
        commands.add_engine_args(serve)
        commands.register_offline_commands(sub)
    else:
        serve.set_defaults(func=_engine_missing)
    return parser


def _engine_missing(args: argparse.Namespace) -> int:
    print("mtpserve: the engine package (mtpserve.decoding.commands / engine) is not "
          "available in this installation", file=sys.stderr)
    return 2


def _make_server_class() -> type:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server that drains with the port open, then exits 0.

        The first SIGTERM/SIGINT starts draining (`on_signal`): the listening socket stays
        open, so new requests and /health get 503 (OpenAI's error schema) instead of a
        refused connection, while in-flight requests go on. Once nothing is in flight
        (`is_idle`) or the drain deadline passes, uvicorn's own shutdown runs with what is
        left of the deadline as its grace period; whatever is still running then is
        cancelled (and aborted in the engine). A second signal shuts down at once.

        uvicorn re-raises a captured SIGTERM after a graceful shutdown (exit status 143);
        a drained shutdown is a success here, so the captured signals are dropped.
        """

        def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None],
                     is_idle: Callable[[], bool], drain_timeout: float) -> None:
            super().__init__(config)
            self._on_signal = on_signal
            self._is_idle = is_idle
            self._drain_timeout = drain_timeout
            self._drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._drain_deadline is None and not self.should_exit:
                self._drain_deadline = time.monotonic() + self._drain_timeout
                try:
                    self._on_signal()
                except Exception:  # never let draining bookkeeping block the shutdown
                    log.exception("begin_drain failed")
                    self.should_exit = True
            else:  # second signal: stop now
                super().handle_exit(sig, frame)
            self._captured_signals.clear()

        async def on_tick(self, counter: int) -> bool:
            if self._drain_deadline is not None and not self.should_exit:
                left = self._drain_deadline - time.monotonic()
                idle = self._is_idle()
                if idle or left <= 0:
                    if not idle:
                        log.warning("drain timeout: shutting down with requests in flight")
                    # uvicorn's own wait for connections and tasks: what is left, at
                    # least a moment for responses being written and for cancellations
                    self.config.timeout_graceful_shutdown = max(1.0, left)
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = _commands()
    assert commands is not None  # build_parser routes to _engine_missing otherwise
    try:
        engine_config = commands.engine_config_from_args(args)
        settings = ServerSettings(
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_queued=args.max_queued,
            max_body_bytes=args.max_body_bytes,
            drain_timeout=args.drain_timeout,
            cors_origins=list(args.cors_origins or []),
            log_prompts=args.log_prompts,
            served_model_name=args.served_model_name,
            max_tokens_limit=args.max_tokens_limit,
        )
    except ValueError as exc:
        print(f"mtpserve serve: {exc}", file=sys.stderr)
        return 2
    if not settings.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key", args.host)

    from mtpserve.decoding.engine import LLMEngine

    def load() -> Any:
        return LLMEngine.from_config(engine_config)

    exit_code = 0
    server: Any = None

    def on_load_error(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = 1
        if server is not None:
            server.should_exit = True

    app = create_app(load, settings, on_load_error=on_load_error)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout,
                            lifespan="on", server_header=False)
    state = app.state.mtp
    server = _make_server_class()(
        config, on_signal=state.begin_drain,
        is_idle=lambda: state.client is None or state.client.inflight == 0,
        drain_timeout=settings.drain_timeout)
    server.run()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
