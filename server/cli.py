"""`mtpserve` command line: `serve` (this package) plus the engine's offline commands
(`generate`, `bench`, `train-heads`, `inspect`) registered by `mtpserve.decoding.tools.commands`.
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
VLLM_CACHE_ENV = "MTPSERVE_CACHE_DIR"
VLLM_ONLY_FLAGS = ("tensor_parallel_size", "pipeline_parallel_size", "num_speculative_tokens",
                   "vllm_engine_args", "vllm_cache_dir")


def _commands() -> ModuleType | None:
    """The engine's command module, or None where this installation lacks it."""
    if importlib.util.find_spec("mtpserve.decoding.tools.commands") is None:
        return None
    return importlib.import_module("mtpserve.decoding.tools.commands")


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
    g.add_argument("--backend", default="native", choices=["native", "vllm"],
                   help="engine behind the server: native (this project's engine, default) "
                        "or vllm (vLLM's async engine: tensor / pipeline parallel, "
                        "multi-node; needs pip install 'mtpserve[vllm]'). Same routes, "
                        "errors, auth and metrics; native-only features are refused")
    v = parser.add_argument_group("vLLM backend (--backend vllm)")
    v.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="GPUs each model replica is split over (vLLM; default 1)")
    v.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="N",
                   help="pipeline stages, e.g. one per node (vLLM; default 1)")
    v.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="tokens drafted per step (vLLM; default: the number of heads for "
                        "Medusa, 4 for ngram)")
    v.add_argument("--vllm-engine-args", default=None, metavar="JSON",
                   help="more vllm AsyncEngineArgs as a JSON object, e.g. "
                        "'{\"enforce_eager\": true, \"gpu_memory_utilization\": 0.8}'")
    v.add_argument("--vllm-cache-dir", default=None, metavar="DIR",
                   help="where GGUF models and project-format heads are exported for vLLM "
                        f"(default: ${{{VLLM_CACHE_ENV}}}/vllm or ~/.cache/mtpserve/vllm)")


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
    parser._mtp_serve = serve  # type: ignore[attr-defined]  # for explicit_flags()
    commands = _commands()
    if commands is not None:
        commands.add_engine_args(serve)
        commands.register_offline_commands(sub)
    else:
        serve.set_defaults(func=_engine_missing)
    return parser


def _engine_missing(args: argparse.Namespace) -> int:
    print("mtpserve: the engine package (mtpserve.decoding.tools.commands / engine) is not "
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


def _backend_loader(args: argparse.Namespace, engine_config: Any) -> Callable[[], Any] | int:
    """The engine factory for --backend (called on the load thread), or an exit status
    after printing why the configuration is refused."""
    explicit = set(getattr(args, "explicit", set()))
    if getattr(args, "backend", "native") == "vllm":
        from .vllm_backend import VllmBackend
        from .vllm_options import BackendConfigError, import_vllm, options_from_args

        try:
            options = options_from_args(args, explicit)
            import_vllm()
        except BackendConfigError as exc:
            print(f"mtpserve serve: {exc}", file=sys.stderr)
            return 2
        return lambda: VllmBackend(options)
    given = [f"--{d.replace('_', '-')}" for d in VLLM_ONLY_FLAGS
             if d in explicit and getattr(args, d, None) not in (None, 1)]
    if given:
        print(f"mtpserve serve: {', '.join(given)}: only with --backend vllm (the native "
              f"engine runs on one device)", file=sys.stderr)
        return 2
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    return lambda: LLMEngine.from_config(engine_config)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import ServerSettings, create_app

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = _commands()
    assert commands is not None  # build_parser routes to _engine_missing otherwise
    try:
        engine_config = (None if getattr(args, "backend", "native") == "vllm"
                         else commands.engine_config_from_args(args))
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

    load = _backend_loader(args, engine_config)
    if isinstance(load, int):
        return load

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


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The `serve` options given on the command line (dests), whatever their values: the
    vLLM backend refuses native-only flags only when the user asked for them."""
    serve = getattr(parser, "_mtp_serve", None)
    if serve is None or "serve" not in argv:
        return set()
    rest = argv[argv.index("serve") + 1:]
    saved = [(a, a.default) for a in serve._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        ns, _ = serve.parse_known_args(rest, argparse.Namespace())
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "serve":
        args.explicit = explicit_flags(parser, argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
