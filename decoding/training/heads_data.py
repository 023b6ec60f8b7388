"""Training data for draft heads: read sources, let the base model answer prompts.

Three kinds of input, told apart by extension and by the keys of each JSON line:
- `.py` / `.txt` / `.md` (any other non-JSONL file too): plain text, every position trains;
- JSONL `{"text": ...}`: the same, one document per line;
- JSONL `{"prompt": ...}` or `{"messages": [...]}`: the base model ANSWERS them (greedy,
  speculation off, chat template applied) and only the answer positions train: heads
  learn what the model itself says, which is what they must guess at serving time;
- JSONL `{"prompt_ids": [...], "completion_ids": [...]}`: answers generated earlier (the
  cache `generate_answers` writes), used as they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

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


def generate_answers(engine, prompts: list[list[dict]], cache: Path, max_tokens: int,
                     chunk: int = 64, progress=None) -> tuple[list[Example], dict]:
    """Answer every conversation greedily with `engine` (speculation off), appending one
    JSON line per answer to `cache` as soon as its chunk finishes; answers already in the
    cache are reused (so an interrupted run resumes). Returns examples and timing."""
    from ..config import SamplingParams

    done: dict[str, dict] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                done[obj["key"]] = obj
    todo = [m for m in prompts if messages_key(m) not in done]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, speculate=False)
    tok = engine.tokenizer
    t0 = time.perf_counter()
    new_tokens = 0
    cache.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        ids = [tok.encode_chat(m) for m in part]
        results = engine.generate(ids, params)
        with cache.open("a", encoding="utf-8") as fh:
            for msgs, p_ids, r in zip(part, ids, results):
                obj = {"key": messages_key(msgs), "messages": msgs, "prompt_ids": p_ids,
                       "completion_ids": r["token_ids"], "completion": r["text"],
                       "finish_reason": r["finish_reason"]}
                done[obj["key"]] = obj
                fh.write(json.dumps(obj) + "\n")
                new_tokens += len(r["token_ids"])
        elapsed = time.perf_counter() - t0
        msg = (f"generated {min(start + chunk, len(todo))}/{len(todo)} answers, {new_tokens} tokens, "
               f"{elapsed:.0f} s ({new_tokens / max(elapsed, 1e-9):.1f} tok/s)")
        (progress or log.info)(msg)
    examples = []
    for m in prompts:
        obj = done[messages_key(m)]
        examples.append(Example(obj["prompt_ids"] + obj["completion_ids"],
                                max(0, len(obj["prompt_ids"]) - 1)))
    stats = {"answers": len(prompts), "answers_generated_now": len(todo),
             "generated_tokens_now": new_tokens,
             "generation_seconds": round(time.perf_counter() - t0, 1),
             "answer_tokens": sum(len(done[messages_key(m)]["completion_ids"]) for m in prompts)}
    return examples, stats
