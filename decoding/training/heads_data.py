"""Training data for draft heads: read the sources (the model answers prompts in answer_gen.py).

Three kinds of input, told apart by extension and by the keys of each JSON line:
- `.py` / `.txt` / `.md` (any other non-JSONL file too): plain text, every position trains;
- JSONL `{"text": ...}`: the same, one document per line;
- JSONL `{"prompt": ...}` or `{"messages": [...]}`: the base model ANSWERS them (greedy
  and/or sampled, speculation off, chat template applied) and only the answer positions train: heads
  learn what the model itself says, which is what they must guess at serving time;
- JSONL `{"prompt_ids": [...], "completion_ids": [...]}`: answers generated earlier (the
  cache answer_gen.py's `generate_answers` writes), used as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".py", ".txt", ".md")


@dataclass(slots=True)
class Example:
    ids: list[int]
    train_from: int  # positions t >= train_from (reading h_t) carry a loss


@dataclass(slots=True)
class Sources:
    examples: list[Example]
    prompts: list[list[dict]]  # chat conversations still to be answered by the model
    recipe: list[dict]  # what was read, for heads.json


def _messages(obj: dict, where: str) -> list[dict] | None:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        # The model answers the conversation so far: drop a trailing assistant turn.
        if msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        return msgs
    if "prompt" in obj:
        return [{"role": "user", "content": str(obj["prompt"])}]
    return None


def read_sources(paths: list[str], tokenizer) -> Sources:
    examples: list[Example] = []
    prompts: list[list[dict]] = []
    recipe: list[dict] = []
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES + (".jsonl",)))
        elif p.exists():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such data file or folder")
    for f in files:
        counts = {"texts": 0, "prompts": 0, "generated": 0}
        if f.suffix == ".jsonl":
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{f}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not JSON ({exc})") from None
                if "prompt_ids" in obj and "completion_ids" in obj:
                    p_ids, c_ids = list(obj["prompt_ids"]), list(obj["completion_ids"])
                    examples.append(Example(p_ids + c_ids, max(0, len(p_ids) - 1)))
                    counts["generated"] += 1
                elif "text" in obj:
                    examples.append(Example(tokenizer.encode(str(obj["text"])), 0))
                    counts["texts"] += 1
                else:
                    msgs = _messages(obj, where)
                    if msgs is None:
                        raise ValueError(f"{where}: expected 'text', 'prompt', 'messages' "
                                         "or 'prompt_ids'+'completion_ids'")
                    prompts.append(msgs)
                    counts["prompts"] += 1
        else:
            examples.append(Example(tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")), 0))
            counts["texts"] += 1
        recipe.append({"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()[:16],
                       **{k: v for k, v in counts.items() if v}})
    return Sources(examples, prompts, recipe)


def messages_key(msgs: list[dict]) -> str:
    """The answers cache key of a chat prompt (its messages, key order ignored)."""
    return hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()[:20]
