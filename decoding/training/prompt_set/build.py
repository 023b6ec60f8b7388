"""Writes prompt_set.jsonl: ~8,400 diverse chat prompts for self-distilling draft heads (#24).

Why: the shipped heads learned from the model's answers to 718 mostly "explain X / write a
function that Y" prompts and accept little on general chat. Real traffic is broader and
copy-heavy (summaries, translations, answers over a passage the prompt gives, follow-ups
that rework an earlier answer), and heads learn what they see. This script writes seven
kinds, each up to a fixed quota:

- instruct: instructions and open questions over a topic list, with style constraints;
- code: write (task x language x constraint), explain / review / convert a given snippet,
  fix a snippet with an injected bug;
- math: word problems with fresh numbers and names, asking for step-by-step answers;
- summarize, translate, passage_qa: over passages built from templates (fictional towns,
  people, products, meetings, e-mails, recipes, species, notices, reviews, itineraries),
  so the facts asked about are in the prompt and nothing is real-world trivia;
- multi_turn: {"messages": [...]} conversations whose earlier assistant turn is written
  here from the same data (an extractive summary, a worked solution, a snippet, a
  clarifying question) and whose last user turn asks to rework it.

Nothing is taken from or paraphrases an evaluation set (HumanEval, MBPP, MT-bench,
Spec-Bench, GSM8K, CNN/DailyMail, XSum, WMT, Natural Questions): every prompt is composed
here from hand-written lists and random fictional slots. Prompts that mention a topic of
heldout_chat_prompts.jsonl are dropped, as make_prompts.py does. Deduplicated on the
normalized text of the whole conversation.

Deterministic for a seed: `python -m mtpserve.decoding.training.prompt_set.build
[--seed 0] [--out PATH]` writes decoding/training/data/prompt_set.jsonl and prints the
count per category and the file's sha256. The kinds: tasks.py, passages.py, slots.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from .passages import gen_passage_qa, gen_summarize, gen_translate, passage
from .slots import LANGS
from .tasks import ASK, SNIPPETS, gen_code, gen_instruct, gen_math, math_problem

DATA = Path(__file__).resolve().parents[1] / "data"  # training/data/
HELDOUT_FILE = DATA / "heldout_chat_prompts.jsonl"
# heldout_chat_prompts.jsonl: measured, never trained on (make_prompts.py's list).
HELD_OUT_TOPICS = ("tidy", "gears", "bread", "alligator", "crocodile", "new job", "rainbow",
                   "rainbows", "guitar", "ipv4")
QUOTA = {"instruct": 2200, "code": 1600, "math": 1200, "summarize": 900, "translate": 700,
         "passage_qa": 1000, "multi_turn": 800}
CATEGORIES = tuple(QUOTA)



PLANS = [("a birthday party for my daughter", "how many guests are coming and what budget you have",
          "About {k} kids and a budget of ${b}."),
         ("a weekend trip to the mountains", "how you will travel and how many nights you want to stay",
          "By car, {k2} nights, and we have ${b} to spend."),
         ("a study schedule for my exams", "how many subjects you have and how many weeks are left",
          "{k2} subjects and {k2} weeks left."),
         ("a small vegetable garden", "how much space and sunlight you have",
          "About {k} square metres with sun in the afternoon."),
         ("a fundraising event at my school", "what kind of event you imagine and how many people may come",
          "A bake sale and games, maybe {k}0 people."),
         ("a workout routine", "how many days a week you can train and what equipment you have",
          "{k2} days a week, only dumbbells at home."),
         ("a surprise dinner for my parents' anniversary", "how many people and what food they like",
          "{k2} people, they love Italian food, budget ${b}.")]
FOLLOW_SUMMARY = ["Now make it shorter.", "Turn your summary into three bullet points.",
                  "Translate your summary into {lang}.", "What is the most important number in the text?",
                  "Write a title for it.", "Now write it as a short tweet.", "Which detail did you leave out?",
                  "Rewrite the summary for a ten-year-old."]
FOLLOW_MATH = ["Can you check the answer a different way?", "Explain the second step in more detail.",
               "Write a similar problem for me to practise, with its solution.",
               "Now solve it again with all the numbers doubled.", "Why did you do the steps in that order?",
               "Can you turn this into a general formula?"]
FOLLOW_CODE = ["Add type hints and a docstring.", "Now write unit tests for it.",
               "Can you make it handle empty input?", "Explain how it works line by line.",
               "Rewrite it in {lang}.", "Is there a faster way to do this?", "Can you make it a one-liner?",
               "What edge cases should I worry about?"]
FOLLOW_PLAN = ["What should I do first?", "Can you make me a checklist?", "Give me a day-by-day plan.",
               "What are the most common mistakes to avoid?", "Can you estimate the costs?"]


def gen_multi_turn(r: random.Random) -> list[dict]:
    k = r.randrange(4)
    lang = r.choice(LANGS)
    if k == 0:
        kind, text, _ = passage(r)
        sents = re.split(r"(?<=[.!?])\s+", text)
        first = f"Summarize this {kind}:\n\n{text}"
        answer = " ".join(sents[:2])
        follow = r.choice(FOLLOW_SUMMARY)
    elif k == 1:
        q, sol = math_problem(r)
        first, answer, follow = q + r.choice(ASK), sol, r.choice(FOLLOW_MATH)
    elif k == 2:
        task, code = r.choice(SNIPPETS)
        first = f"Write a Python function that {task}."
        answer = f"Here is a simple version:\n\n```python\n{code}```"
        follow = r.choice(FOLLOW_CODE)
    else:
        what, question, detail = r.choice(PLANS)
        first = f"Can you help me plan {what}?"
        answer = f"Of course! To make a good plan, could you tell me {question}?"
        follow = (detail.format(k=r.randint(5, 25), k2=r.randint(2, 5), b=r.randint(5, 60) * 10)
                  + " " + r.choice(FOLLOW_PLAN))
    return [{"role": "user", "content": first}, {"role": "assistant", "content": answer},
            {"role": "user", "content": follow.format(lang=lang)}]


GENERATORS: dict[str, Callable[[random.Random], str | list[dict]]] = {
    "instruct": gen_instruct, "code": gen_code, "math": gen_math, "summarize": gen_summarize,
    "translate": gen_translate, "passage_qa": gen_passage_qa, "multi_turn": gen_multi_turn,
}


# ---------------------------------------------------------------- assembly
def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def conversation(rec: dict) -> list[dict]:
    """A record's messages (a `prompt` record as one user turn)."""
    return rec["messages"] if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]


def user_texts(path: Path) -> list[str]:
    """The user turns of a prompts JSONL ({"prompt"} or {"messages"} records)."""
    return [m["content"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() for m in conversation(json.loads(line)) if m["role"] == "user"]


def heldout_texts(path: Path = HELDOUT_FILE) -> set[str]:
    """The normalized user texts of the held-out prompts."""
    return {normalize(t) for t in user_texts(path)}


def build(seed: int = 0, quota: dict[str, int] | None = None) -> list[dict]:
    """Records {"prompt" | "messages", "category"}: each category filled to its quota with
    distinct conversations, none touching a held-out topic, shuffled together."""
    quota = quota or QUOTA
    held = heldout_texts()
    banned = re.compile(r"\b(" + "|".join(map(re.escape, HELD_OUT_TOPICS)) + r")\b", re.IGNORECASE)
    seen: set[str] = set()
    out: list[dict] = []
    for cat in CATEGORIES:
        r = random.Random(f"{seed}:{cat}")  # one stream per category: quotas are independent
        got, tries = 0, 0
        while got < quota.get(cat, 0):
            tries += 1
            if tries > 50 * quota[cat]:
                raise RuntimeError(f"{cat}: only {got} distinct prompts after {tries} tries")
            item = GENERATORS[cat](r)
            rec = {"messages": item} if isinstance(item, list) else {"prompt": item}
            msgs = conversation(rec)
            text = "\n".join(m["content"] for m in msgs)
            key = normalize(json.dumps([[m["role"], normalize(m["content"])] for m in msgs]))
            if key in seen or banned.search(text) or any(
                    normalize(m["content"]) in held for m in msgs if m["role"] == "user"):
                continue
            seen.add(key)
            out.append({**rec, "category": cat})
            got += 1
    random.Random(seed).shuffle(out)  # any prefix is a mix of kinds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DATA / "prompt_set.jsonl"))
    a = ap.parse_args()
    recs = build(a.seed)
    data = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in recs).encode()
    Path(a.out).write_bytes(data)
    counts: dict[str, int] = {}
    for rec in recs:
        counts[rec["category"]] = counts.get(rec["category"], 0) + 1
    for cat in CATEGORIES:
        print(f"{cat:12s} {counts.get(cat, 0):6d}")
    print(f"{'total':12s} {len(recs):6d}  ({len(data) / 1e6:.2f} MB) -> {a.out}")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
