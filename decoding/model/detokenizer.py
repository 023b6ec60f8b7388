"""Incremental (streaming) detokenization: the text of generated tokens as they arrive,
never splitting a multi-byte UTF-8 character.

Separate from tokenizer.py because it needs nothing of a Tokenizer but `decode`; it is
the per-request streaming state the engine keeps (scheduler.py, llm_engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Streams the text of generated tokens, never splitting a multi-byte UTF-8 character.

    Each `add()` decodes only a short window: a few already-emitted tokens as context (so
    context-sensitive decoders, e.g. sentencepiece's leading-space strip, behave as in a full
    decode) plus the pending ones. Text whose window ends in U+FFFD (an incomplete character)
    is held back; `flush()` emits what is left, with replacement characters only then.

    Without `prompt_ids`, the concatenated output equals `tokenizer.decode(output_ids)` whenever
    that decode is valid text. With `prompt_ids`, the prompt's tail is the initial context, so
    the text is what the output adds after the prompt (a sentencepiece leading space is kept).
    """

    _CONTEXT = 6  # tokens of already-emitted context kept in the window

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._read = len(self._window)  # window[:read] is context already emitted, window[read:] pending

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (possibly "")."""
        if not token_ids:
            return ""
        self._window.extend(int(i) for i in token_ids)
        text, complete = self._pending_text()
        if not complete:
            return ""
        self._window = self._window[max(0, len(self._window) - self._CONTEXT):]
        self._read = len(self._window)
        return text

    def flush(self) -> str:
        """Emit whatever is held back (end of generation); incomplete bytes become U+FFFD."""
        text, _ = self._pending_text()
        self._window = self._window[max(0, len(self._window) - self._CONTEXT):]
        self._read = len(self._window)
        return text

    def _pending_text(self) -> tuple[str, bool]:
        if self._read == len(self._window):
            return "", True
        prefix = self._tok.decode(self._window[: self._read], self._skip) if self._read else ""
        full = self._tok.decode(self._window, self._skip)
        return full[len(prefix):], not full.endswith("\ufffd")
