"""Chat templates: compiling a model's Jinja chat template the way transformers'
`apply_chat_template` does (same sandbox, filters and globals, so templates render
byte-identically), validating the messages, and rendering with every template failure
turned into a ValueError.

Separate from tokenizer.py because it depends only on jinja2, not on the vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def check_messages(messages: Any) -> list[dict]:
    """Validated copies of chat messages, dropping None-valued keys as transformers does."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {role!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        checked.append({k: v for k, v in message.items() if v is not None})
    return checked


def render_chat_template(
    source: str,
    messages: list[dict],
    tools: Sequence[Mapping[str, Any]] | None,
    add_generation_prompt: bool,
    specials: Mapping[str, str | None],
) -> str:
    """`source` rendered over already checked `messages` (see `check_messages`), with the
    special tokens' texts (bos_token, eos_token) as variables. Any problem -> ValueError."""
    try:
        return compile_template(source).render(
            messages=messages,
            tools=list(tools) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **specials,
        )
    except jinja2.exceptions.TemplateError as exc:  # raise_exception(...), syntax, undefined, security
        raise ValueError(f"chat template rejected the messages: {exc}") from exc
    except (TypeError, KeyError, IndexError, AttributeError) as exc:  # e.g. content of the wrong type
        raise ValueError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc
