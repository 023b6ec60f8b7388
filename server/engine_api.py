"""The one engine interface the server talks to, and its native implementation.

`EngineBackend` is what `server/` needs from an engine: load (`start`, blocking, on a
worker thread), `submit` one request (prompt ids + `SamplingParams`, outputs delivered as
`RequestOutput` deltas through a callback), `abort`, `stats`, `stop`, plus the tokenizer,
model name, context length and batch size. `EngineClient` (engine_client.py) builds the
group-level API on top of it: submit the choices of one HTTP request together and iterate
their deltas as one async stream, with admission control.

`check_request` is where a backend refuses request features it cannot honour
(`UnsupportedRequest`, HTTP 400 naming the field), before anything reaches the engine.

Two implementations: `NativeBackend` (this module: `decoding/`'s `LLMEngine` stepped by an
`EngineRunner` thread) and `VllmBackend` (vllm_backend.py: vLLM's async engine; imported
only when `--backend vllm` is chosen).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Callable

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.outputs import EngineStats, RequestOutput

log = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


class UnsupportedRequest(ValueError):
    """A request field this backend cannot honour (HTTP 400 with `param` = the field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class EngineBackend(ABC):
    """An engine behind the server. Attributes are valid once `start()` has returned."""

    name: str = "?"
    model_name: str = ""
    max_model_len: int = 0
    max_num_seqs: int = 1
    tokenizer: Any = None  # encode / encode_chat / decode / vocab_size / token_bytes
    speculation_available: bool = False

    @property
    def engine(self) -> Any:
        """What `ServerState.engine` exposes to the routes (tokenizer, model_name...)."""
        return self

    @abstractmethod
    def start(self) -> None:
        """Load and start; blocking, called on a worker thread (not the event loop)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop; unfinished requests are aborted. Blocking, called off the event loop."""

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               on_output: OutputCallback) -> None:
        """Queue one request; called on the event loop thread. `on_output` gets every
        delta (cumulative `num_output_tokens`, `finished` on the last) and may be called
        from any thread. Raises ValueError for a request the engine rejects."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Abort a request (no-op when finished); called on the event loop thread."""

    @abstractmethod
    def stats(self) -> EngineStats | None: ...

    def check_request(self, params: SamplingParams) -> None:
        """Raise `UnsupportedRequest` for what this backend cannot do (default: all ok)."""

    def describe(self) -> str:
        return self.name


class NativeBackend(EngineBackend):
    """`decoding/`'s engine on its runner thread."""

    name = "native"

    def __init__(self, source: Any) -> None:
        """`source`: an `LLMEngine` (this backend owns and stops its runner) or an
        `EngineRunner` (shared: started if needed, never stopped here)."""
        from mtpserve.decoding.engine.runner import EngineRunner

        if isinstance(source, EngineRunner):
            self.runner, self.owns_runner = source, False
        else:
            self.runner, self.owns_runner = EngineRunner(source), True
        eng = self.runner.engine
        self.model_name = eng.model_name
        self.max_model_len = int(eng.max_model_len)
        self.max_num_seqs = int(eng.config.max_num_seqs)
        self.tokenizer = eng.tokenizer

    @property
    def engine(self) -> Any:
        return self.runner.engine

    @property
    def speculation_available(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.runner.engine, "speculation_available", True))

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        if self.owns_runner:
            self.runner.stop()

    @property
    def is_alive(self) -> bool:
        return self.runner.is_alive

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               on_output: OutputCallback) -> None:
        self.runner.submit(request_id, prompt_token_ids, params, on_output)

    def abort(self, request_id: str) -> None:
        self.runner.abort(request_id)

    def stats(self) -> EngineStats | None:
        return self.runner.stats()

    def describe(self) -> str:
        eng = self.runner.engine
        spec = eng.config.spec
        return (f"native engine: weights {getattr(eng, 'weight_format', '?')}, "
                f"{str(getattr(eng, 'dtype', '?')).removeprefix('torch.')}, KV cache "
                f"{str(getattr(eng, 'kv_dtype', '?')).removeprefix('torch.')}; speculate "
                f"{spec.mode}, proposer {spec.proposer}, draft heads "
                f"{'loaded' if getattr(eng, 'heads', None) is not None else 'none'}")
