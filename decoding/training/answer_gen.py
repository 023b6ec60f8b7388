"""The base model answers the training prompts through the engine, at scale: greedy and
sampled answers in one resumable JSONL cache, with a progress bar and a token report.

Why a module of its own: #24 grows the self-distilled data tenfold (~1.5M answer tokens),
so generation becomes a long stage that must keep the engine full, survive interruption
and say how fast it goes; heads_data.py keeps reading sources.

- Continuous batching: up to `in_flight` requests are queued in the engine and a new one
  is added as soon as one finishes (no chunk waits for its longest answer); each answer
  is appended to the cache the moment it finishes, so an interrupted run loses only the
  answers still running and a rerun generates only what the cache lacks.
- Greedy answers (key: `messages_key`, as the caches written before) and, per prompt,
  `samples` answers at `temperature` (key adds temperature, seed and sample index), each
  request seeded from (seed, prompt key, sample index): a resume asks for the same sample.
  Every record says which (`mode`: greedy | sampled; records without it are greedy).
- Speculation is off: the answers are the model's own, whatever heads exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import SamplingParams
from .heads_data import Example, messages_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AnswerJob:
    """One answer to generate: a conversation, greedy or the `sample`-th sampled answer."""

    msgs: list[dict]
    key: str
    mode: str  # greedy | sampled
    sample: int = 0
    temperature: float = 0.0
    seed: int | None = None


def sample_seed(seed: int, key: str, sample: int) -> int:
    """The request seed of one sampled answer: fixed by (run seed, prompt, sample index)."""
    return int(hashlib.sha256(f"{seed}:{key}:{sample}".encode()).hexdigest()[:15], 16)


def answer_jobs(prompts: list[list[dict]], greedy: bool = True, samples: int = 0,
                temperature: float = 0.7, seed: int = 0) -> list[AnswerJob]:
    """Every answer wanted, in data order: each prompt's greedy answer, then its samples."""
    if samples < 0 or (samples and not 0.0 < temperature <= 2.0):
        raise ValueError("need samples >= 0 and a temperature in (0, 2] for sampled answers")
    if not greedy and not samples:
        raise ValueError("nothing to generate: no greedy answers and no samples")
    jobs = []
    for m in prompts:
        base = messages_key(m)
        if greedy:
            jobs.append(AnswerJob(m, base, "greedy"))
        for i in range(samples):
            jobs.append(AnswerJob(m, f"{base}/t{temperature:g}/s{seed}/{i}", "sampled", i,
                                  temperature, sample_seed(seed, base, i)))
    return jobs


def read_cache(cache: Path) -> dict[str, dict]:
    """The cached answers by key. A last line cut short by an interrupted write is dropped
    from the file, so the next append starts on a line of its own."""
    done: dict[str, dict] = {}
    if not cache.exists():
        return done
    raw = cache.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        log.warning("%s: dropping a partly written last line", cache)
        cache.write_bytes(complete)
    for line in complete.decode("utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            done[obj["key"]] = obj
    return done


class GenerationBar:
    """tqdm over answers with tokens/s in the postfix (tqdm's ETA follows the answers'
    rate); without tqdm, a `say` line every `every` answers."""

    def __init__(self, total: int, say: Callable[[str], None], every: int) -> None:
        self.total, self.say, self.every = total, say, max(1, every)
        self.done = self.tokens = 0
        self.t0 = time.perf_counter()
        try:
            from tqdm import tqdm

            self.t = tqdm(total=total, desc="answers", unit="ans", dynamic_ncols=True)
        except ImportError:
            self.t = None

    def line(self) -> str:
        s = time.perf_counter() - self.t0
        rate = self.tokens / max(s, 1e-9)
        left = (self.total - self.done) * self.tokens / max(1, self.done) / max(rate, 1e-9)
        return (f"generated {self.done}/{self.total} answers, {self.tokens} tokens, {s:.0f} s "
                f"({rate:.1f} tok/s, ETA {left / 60:.1f} min)")

    def add(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        if self.t is not None:
            self.t.update(1)
            self.t.set_postfix_str(f"{self.tokens} tok, "
                                   f"{self.tokens / max(time.perf_counter() - self.t0, 1e-9):.1f} tok/s",
                                   refresh=False)
        elif self.done % self.every == 0 or self.done == self.total:
            self.say(self.line())

    def close(self) -> None:
        if self.t is not None:
            self.t.close()


def _record(job: AnswerJob, p_ids: list[int], token_ids: list[int], text: str,
            finish_reason: str | None) -> dict:
    obj = {"key": job.key, "messages": job.msgs, "mode": job.mode, "prompt_ids": p_ids,
           "completion_ids": token_ids, "completion": text, "finish_reason": finish_reason}
    if job.mode == "sampled":
        obj.update(temperature=job.temperature, seed=job.seed, sample=job.sample)
    return obj


@dataclass(frozen=True, slots=True)
class Finished:
    """One request the engine finished: its generated token ids and text."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None


def finished_requests(engine, requests: Iterator[tuple[str, list[int], SamplingParams]],
                      in_flight: int) -> Iterator[Finished]:
    """Continuous batching for offline generation: keep up to `in_flight` of `requests`
    (request id, prompt ids, params) in the engine, adding the next as soon as one
    finishes, and yield each as it finishes. An interruption (or the caller stopping)
    aborts what still runs, so the engine is left empty."""
    live: dict[str, tuple[list[int], list[str]]] = {}
    try:
        while True:
            while len(live) < in_flight and (nxt := next(requests, None)) is not None:
                engine.add_request(*nxt)
                live[nxt[0]] = ([], [])
            if not live:
                return
            for out in engine.step():
                entry = live.get(out.request_id)
                if entry is None:
                    continue
                entry[0].extend(out.new_token_ids)
                entry[1].append(out.new_text)
                if out.finished:
                    del live[out.request_id]
                    yield Finished(out.request_id, entry[0], "".join(entry[1]),
                                   out.finish_reason, out.error)
    finally:
        for rid in list(live):
            with contextlib.suppress(Exception):  # a broken engine: the first error stands
                engine.abort_request(rid)


def run_jobs(engine, jobs: list[AnswerJob], cache: Path, max_tokens: int, in_flight: int,
             say: Callable[[str], None]) -> dict:
    """Generate `jobs` with `engine`, at most `in_flight` requests queued at once, each
    answer appended to `cache` when it finishes. Returns the counts of this run."""
    tok = engine.tokenizer
    started: dict[str, tuple[AnswerJob, list[int]]] = {}

    def requests() -> Iterator[tuple[str, list[int], SamplingParams]]:
        for n, job in enumerate(jobs):
            p_ids = tok.encode_chat(job.msgs)
            started[f"answer-{n}"] = (job, p_ids)
            yield f"answer-{n}", p_ids, SamplingParams(
                max_tokens=max_tokens, temperature=job.temperature, seed=job.seed,
                speculate=False)

    bar = GenerationBar(len(jobs), say, in_flight)
    failed = 0
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        with cache.open("a", encoding="utf-8") as fh:
            for fin in finished_requests(engine, requests(), in_flight):
                job, p_ids = started.pop(fin.request_id)
                if fin.error:
                    failed += 1
                    say(f"answer {job.key} failed: {fin.error}")
                    continue
                fh.write(json.dumps(_record(job, p_ids, fin.token_ids, fin.text,
                                            fin.finish_reason)) + "\n")
                fh.flush()
                bar.add(len(fin.token_ids))
    finally:
        bar.close()
    seconds = time.perf_counter() - bar.t0
    return {"answers_generated_now": bar.done, "generated_tokens_now": bar.tokens,
            "failed_now": failed, "generation_seconds": round(seconds, 1),
            "tokens_per_second_now": round(bar.tokens / max(seconds, 1e-9), 1)}


def generate_answers(engine, prompts: list[list[dict]], cache: Path, max_tokens: int,
                     chunk: int = 64, progress: Callable[[str], None] | None = None,
                     greedy: bool = True, samples: int = 0, temperature: float = 0.7,
                     seed: int = 0, only_cached: bool = False) -> tuple[list[Example], dict]:
    """Answer every conversation with `engine` (speculation off): greedily and/or
    `samples` times at `temperature`, keeping up to `chunk` requests queued in the engine;
    answers already in `cache` are reused (an interrupted run resumes). `only_cached`:
    generate nothing, fail when an answer is missing. Returns the examples (data order:
    each prompt's greedy answer, then its samples) and the counts for heads.json."""
    say = progress or log.info
    jobs = answer_jobs(prompts, greedy, samples, temperature, seed)
    done = read_cache(cache)
    todo = [j for j in jobs if j.key not in done]
    if todo and only_cached:
        raise ValueError(f"{cache}: {len(todo)} of {len(jobs)} answers are not cached; "
                         "--draft-vocab-only generates nothing")
    stats = {"answers_generated_now": 0, "generated_tokens_now": 0, "generation_seconds": 0.0}
    if todo:
        stats = run_jobs(engine, todo, cache, max_tokens, chunk, say)
        done = read_cache(cache)
    missing = [j.key for j in jobs if j.key not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} answers failed (see the log); rerun to retry them")
    examples, tokens = [], {"greedy": 0, "sampled": 0}
    for j in jobs:
        obj = done[j.key]
        examples.append(Example(obj["prompt_ids"] + obj["completion_ids"],
                                max(0, len(obj["prompt_ids"]) - 1)))
        tokens[j.mode] += len(obj["completion_ids"])
    stats.update(answers=len(jobs), answer_tokens=tokens["greedy"] + tokens["sampled"])
    if samples:
        stats.update(answer_tokens_greedy=tokens["greedy"], answer_tokens_sampled=tokens["sampled"],
                     samples_per_prompt=samples, temperature=temperature, sample_seed=seed)
    if todo:
        say(f"answers: {len(jobs)} ({len(todo)} generated now: {stats['generated_tokens_now']} "
            f"tokens in {stats['generation_seconds']} s, {stats.get('tokens_per_second_now', 0)} "
            f"tok/s); {stats['answer_tokens']} answer tokens in all")
    return examples, stats
