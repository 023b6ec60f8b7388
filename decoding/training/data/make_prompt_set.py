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

Deterministic for a seed: `python decoding/training/data/make_prompt_set.py [--seed 0]
[--out PATH]` prints the count per category and the file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
HELDOUT_FILE = HERE / "heldout_chat_prompts.jsonl"
# heldout_chat_prompts.jsonl: measured, never trained on (make_prompts.py's list).
HELD_OUT_TOPICS = ("tidy", "gears", "bread", "alligator", "crocodile", "new job", "rainbow",
                   "rainbows", "guitar", "ipv4")
QUOTA = {"instruct": 2200, "code": 1600, "math": 1200, "summarize": 900, "translate": 700,
         "passage_qa": 1000, "multi_turn": 800}
CATEGORIES = tuple(QUOTA)

# ---------------------------------------------------------------- shared vocabulary
FIRST = ["Amara", "Ben", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kavya", "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara",
         "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe", "Arjun", "Bea", "Carlos", "Dana",
         "Emeka", "Fiona", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Marco", "Nia"]
LAST = ["Abara", "Brandt", "Castillo", "Dubois", "Eriksen", "Fontaine", "Garcia", "Haddad",
        "Ito", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
        "Quintero", "Rossi", "Silva", "Tanaka", "Urquhart", "Varga", "Weber", "Yilmaz", "Zhou"]
SYL = ["bar", "wick", "ton", "mere", "ford", "dale", "holm", "ley", "stead", "brook", "vale",
       "more", "ridge", "haven", "field", "burn", "moor", "cliff"]
PRE = ["Ash", "Bel", "Cor", "Dun", "Elm", "Fen", "Glen", "Har", "Ivy", "Kel", "Lin", "Mar",
       "Nor", "Oak", "Pen", "Red", "Sil", "Thorn", "Wil", "Yar"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
LANGS = ["French", "Spanish", "German", "Italian", "Portuguese", "Dutch"]


def person(r: random.Random) -> str:
    return f"{r.choice(FIRST)} {r.choice(LAST)}"


def town(r: random.Random) -> str:
    return r.choice(PRE) + r.choice(SYL)


def date(r: random.Random) -> str:
    return f"{r.choice(MONTHS)} {r.randint(1, 28)}"


# ---------------------------------------------------------------- instruct
TOPICS = [
    "composting", "the water cycle", "time management", "learning a second language",
    "saving for retirement", "container gardening", "sleep hygiene", "remote work",
    "electric cars", "solar panels", "volcanoes", "honeybees", "the immune system",
    "recycling plastics", "public speaking", "meditation", "budget travel", "birdwatching",
    "houseplants", "marathon training", "chess openings", "photography composition",
    "urban cycling", "3D printing", "cloud computing", "password managers",
    "open source software", "the printing press", "ocean tides", "black holes",
    "plate tectonics", "vaccines", "antibiotic resistance", "coral reefs", "desert ecosystems",
    "minimalism", "journaling", "negotiating a salary", "writing a resume", "job interviews",
    "running effective meetings", "giving feedback", "conflict resolution at work",
    "buying a first home", "credit scores", "index funds", "inflation", "supply and demand",
    "small business marketing", "podcasting", "video editing", "board games", "camping",
    "hiking safety", "first aid basics", "fermentation", "knife skills", "meal prepping",
    "vegetarian cooking", "food storage", "dog training", "cat behavior", "freshwater aquariums",
    "beekeeping", "weather forecasting", "climate change", "wind energy", "nuclear power",
    "rechargeable batteries", "how the internet works", "search engines", "machine learning",
    "neural networks", "relational databases", "version control", "unit testing",
    "code review", "agile planning", "cybersecurity", "phishing", "smart home devices",
    "ergonomics", "good posture", "hydration", "stretching", "strength training", "yoga",
    "swimming", "learning to draw", "watercolor painting", "creative writing", "poetry",
    "reading habits", "public libraries", "museums", "volunteering", "parenting toddlers",
    "studying for exams", "note-taking", "memory techniques", "critical thinking",
    "logical fallacies", "the scientific method", "basic statistics", "probability",
    "prime numbers", "geometry", "calculus", "the metric system", "maps and navigation",
    "stargazing", "the phases of the moon", "eclipses", "the seasons", "ancient Rome",
    "the Renaissance", "the industrial revolution", "the history of writing", "high-speed trains",
    "how airplanes fly", "suspension bridges", "skyscrapers", "city planning", "public transport",
    "traffic congestion", "noise pollution", "water conservation", "wildfires", "earthquakes",
    "emergency preparedness", "moving to a new city", "making friends as an adult",
    "long-distance friendships", "planning a wedding", "gift giving", "hosting a dinner party",
    "table manners", "tipping customs", "kayaking", "rock climbing", "skiing", "tomatoes",
    "mushrooms", "tea", "chocolate", "cheese making", "spices", "typography", "color theory",
    "interior design", "woodworking", "knitting", "sewing", "car maintenance",
    "bicycle maintenance", "electric scooters", "renewable energy", "the stock market",
    "personal budgeting", "online privacy", "social media habits", "digital minimalism",
    "learning to code", "spreadsheets", "data visualization", "APIs", "containers and Docker",
    "the Linux command line", "regular expressions", "recursion", "sorting algorithms",
    "hash tables", "caching", "encryption", "game design", "animation", "film photography",
    "jazz", "classical music", "learning the piano", "singing", "dance", "theater",
    "volcanic islands", "glaciers", "rainforests", "wetlands", "migratory birds", "whales",
    "octopuses", "ants", "bats", "wolves", "owls", "soil health", "irrigation", "urban farming",
]
INSTRUCT_FORMS = [
    "Explain {t} to a complete beginner.", "What are the most common misconceptions about {t}?",
    "Write a short blog post about {t}.", "Give me five practical tips about {t}.",
    "What are the pros and cons of {t}?", "Write a haiku about {t}.", "Write a short poem about {t}.",
    "Create a one-week plan for getting started with {t}.",
    "Write a FAQ with five questions and answers about {t}.", "Explain {t} in three paragraphs.",
    "What should a teenager know about {t}?", "Write an outline for a presentation about {t}.",
    "Describe {t} as if you were a museum guide.",
    "Write a short dialogue between a teacher and a student about {t}.",
    "What questions should I ask an expert on {t}?", "Summarize the key ideas of {t} in bullet points.",
    "Write a tweet-length explanation of {t}.", "Explain {t} using an analogy.",
    "Create a quiz with five multiple-choice questions about {t}.",
    "What are the first three steps to learn about {t}?",
    "Write an email inviting colleagues to a lunch talk on {t}.",
    "Why do people find {t} interesting?", "Write a short story in which {t} plays a role.",
    "Write a persuasive paragraph about why everyone should understand {t}.",
    "What are the biggest challenges in {t}?", "Give me a glossary of ten terms related to {t}.",
    "Write a children's story that teaches something about {t}.",
    "How would you explain {t} to a ten-year-old?", "What is a good way to practice {t} every day?",
]
PAIR_FORMS = ["Compare {t} and {u}.", "How are {t} and {u} related?",
              "Write a short essay connecting {t} and {u}.",
              "Which is easier to learn about first, {t} or {u}? Explain why."]
STYLES = ["", " Keep it under 100 words.", " Use simple language.", " Use a friendly tone.",
          " Format the answer as a numbered list.", " Be concise.", " Use headings.",
          " Write it for a general audience.", " Include one concrete example."]
CHARACTERS = ["a retired lighthouse keeper", "a nervous first-year student", "a robot that wants "
              "to cook", "a cat who runs a bookshop", "two rival bakers", "a forgetful wizard",
              "a young astronaut", "a detective who hates rain", "a shy dragon",
              "a farmer who finds a strange seed", "an old clockmaker", "a delivery drone"]
SITUATIONS = ["gets lost in a big city", "has to give a speech", "finds a mysterious map",
              "wins an unexpected prize", "must fix a broken machine before sunrise",
              "meets a talking animal", "moves to a tiny island", "opens a small shop",
              "loses something important", "learns a surprising secret"]
STORY_FORMS = ["Write a short story about {c} who {s}.", "Write a funny scene where {c} {s}.",
               "Write the opening paragraph of a novel about {c} who {s}.",
               "Write a 150-word story about {c} who {s}."]


def gen_instruct(r: random.Random) -> str:
    k = r.random()
    if k < 0.75:
        return r.choice(INSTRUCT_FORMS).format(t=r.choice(TOPICS)) + r.choice(STYLES)
    if k < 0.9:
        t, u = r.sample(TOPICS, 2)
        return r.choice(PAIR_FORMS).format(t=t, u=u) + r.choice(STYLES)
    return r.choice(STORY_FORMS).format(c=r.choice(CHARACTERS), s=r.choice(SITUATIONS))


# ---------------------------------------------------------------- code
CODE_TASKS = [
    "parses a log line of the form 'LEVEL timestamp message' into a dictionary",
    "computes the total price of a shopping cart with an optional discount code",
    "groups a list of bank transactions by month and sums each month",
    "validates a username of 3 to 16 letters, digits or underscores",
    "merges overlapping meeting time slots", "returns the three most active users in a list of events",
    "turns rows of temperature readings into daily averages", "splits a list of items into pages of n",
    "schedules round-robin matches for a list of teams", "computes a library fine from the days overdue",
    "reports the products whose stock is below a threshold", "counts how many times each HTTP status code appears in a log",
    "converts a duration like '1h30m' into seconds", "formats a number of bytes as KB, MB or GB",
    "checks whether two rectangles overlap", "finds the busiest hour in a list of timestamps",
    "masks every e-mail address in a text", "builds an index from words to the line numbers they appear on",
    "deduplicates a list of contacts by e-mail, keeping the newest", "computes the shipping cost from weight and distance zones",
    "renders a list of dictionaries as a plain-text table", "reads a config file of key=value lines, ignoring comments",
    "returns the nth business day after a date", "simulates rolling two dice many times and prints the frequencies",
    "generates a random maze on a grid", "implements a token bucket rate limiter",
    "computes a moving median of a stream of numbers", "finds the cheapest route between cities with Dijkstra's algorithm",
    "implements a tiny to-do list with add, complete and list commands", "splits a bill between friends with tips",
    "converts a Markdown heading line into an HTML heading", "validates a simple date string in YYYY-MM-DD form",
    "tracks a running high score table of the top ten players", "computes the grade letter for a list of scores",
    "counts the words in a text file, ignoring case and punctuation", "implements a simple event emitter with subscribe and publish",
    "retries an operation with exponential backoff", "wraps long lines of text at a given width",
    "checks whether a seating plan puts any two rivals next to each other", "finds anagram groups in a list of words",
    "compresses consecutive duplicate log lines into 'line (xN)'", "computes the net balance of each person from a list of IOUs",
    "converts a nested dictionary into dotted keys", "assigns tasks to workers so the loads stay balanced",
    "parses a recipe ingredient line like '2 cups flour' into quantity, unit and name",
    "implements a bounded queue that drops the oldest item when full",
    "computes how many days remain until a birthday", "detects a cycle in a list of task dependencies",
    "returns a topological order for build steps", "encodes and decodes a Caesar cipher with a given shift",
]
LANGUAGES = ["Python"] * 6 + ["JavaScript", "TypeScript", "Go", "Rust", "Java", "C#", "Kotlin"]
CODE_CONSTRAINTS = ["", " Include type hints.", " Add a docstring and two usage examples.",
                    " Raise a clear error on invalid input.", " Also write unit tests for it.",
                    " Keep it short and readable.", " Explain your approach briefly first.",
                    " Avoid external libraries."]
WRITE_FORMS = ["Write a {lang} function that {task}.", "Implement a {lang} program that {task}.",
               "Can you show me {lang} code that {task}?", "In {lang}, write a class or function that {task}."]

# (task description, code): small, correct functions; bugs are injected by BUGS below.
SNIPPETS = [
    ("returns the largest number in a list", "def largest(xs):\n    best = xs[0]\n    for x in xs[1:]:\n        if x > best:\n            best = x\n    return best\n"),
    ("sums the even numbers in a list", "def sum_even(xs):\n    total = 0\n    for x in xs:\n        if x % 2 == 0:\n            total += x\n    return total\n"),
    ("counts the vowels in a word", "def count_vowels(word):\n    count = 0\n    for ch in word.lower():\n        if ch in 'aeiou':\n            count += 1\n    return count\n"),
    ("returns the average of a list of scores", "def average(scores):\n    if not scores:\n        return 0.0\n    return sum(scores) / len(scores)\n"),
    ("checks whether a year is a leap year", "def is_leap(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n"),
    ("returns the running totals of a list", "def running_totals(xs):\n    out = []\n    total = 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out\n"),
    ("finds the index of a target in a sorted list with binary search", "def find(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n        mid = (lo + hi) // 2\n        if xs[mid] == target:\n            return mid\n        if xs[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1\n"),
    ("counts how often each word occurs in a sentence", "def word_counts(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = counts.get(word, 0) + 1\n    return counts\n"),
    ("returns the items of a list that appear more than once", "def repeated(items):\n    seen, twice = set(), []\n    for item in items:\n        if item in seen and item not in twice:\n            twice.append(item)\n        seen.add(item)\n    return twice\n"),
    ("clamps a value between a minimum and a maximum", "def clamp(value, low, high):\n    if value < low:\n        return low\n    if value > high:\n        return high\n    return value\n"),
    ("returns the factorial of n", "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n"),
    ("splits a list into chunks of a given size", "def chunks(xs, size):\n    return [xs[i:i + size] for i in range(0, len(xs), size)]\n"),
    ("reverses the words of a sentence", "def reverse_words(sentence):\n    words = sentence.split()\n    return ' '.join(reversed(words))\n"),
    ("returns the n-th number of the Fibonacci sequence", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"),
    ("checks whether brackets in a string are balanced", "def balanced(text):\n    pairs = {')': '(', ']': '[', '}': '{'}\n    stack = []\n    for ch in text:\n        if ch in '([{':\n            stack.append(ch)\n        elif ch in pairs:\n            if not stack or stack.pop() != pairs[ch]:\n                return False\n    return not stack\n"),
    ("computes the total of an order with tax", "def order_total(prices, tax_rate):\n    subtotal = sum(prices)\n    tax = subtotal * tax_rate\n    return round(subtotal + tax, 2)\n"),
    ("returns the minimum and maximum of a list in one pass", "def min_max(xs):\n    low = high = xs[0]\n    for x in xs:\n        if x < low:\n            low = x\n        elif x > high:\n            high = x\n    return low, high\n"),
    ("removes duplicates from a list while keeping the order", "def unique(xs):\n    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n            out.append(x)\n    return out\n"),
    ("counts the lines in a file that contain a word", "def count_matching(path, word):\n    count = 0\n    with open(path) as f:\n        for line in f:\n            if word in line:\n                count += 1\n    return count\n"),
    ("merges two sorted lists into one sorted list", "def merge(a, b):\n    i = j = 0\n    out = []\n    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n            out.append(b[j])\n            j += 1\n    return out + a[i:] + b[j:]\n"),
    ("computes the dot product of two vectors", "def dot(u, v):\n    total = 0\n    for a, b in zip(u, v):\n        total += a * b\n    return total\n"),
    ("converts a temperature from Celsius to Fahrenheit", "def to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n"),
    ("returns the characters that two strings share", "def shared_chars(a, b):\n    return sorted(set(a) & set(b))\n"),
    ("counts the digits of a positive integer", "def digit_count(n):\n    count = 1\n    while n >= 10:\n        n //= 10\n        count += 1\n    return count\n"),
]
# (pattern, replacement): the first one found in a snippet makes its buggy version.
BUGS = [("<=", "<"), (">=", ">"), ("+ 1", ""), ("- 1", ""), ("== 0", "== 1"), ("+= 1", "-= 1"),
        ("range(2, n + 1)", "range(2, n)"), ("xs[1:]", "xs[2:]"), ("return not stack", "return True"),
        ("* 9 / 5 + 32", "* 5 / 9 + 32"), ("a, b = b, a + b", "a, b = b, a"), ("/ len(scores)", "/ (len(scores) - 1)"),
        ("elif x > high", "if x > high"), ("& set(b)", "| set(b)"), ("total += x", "total = x")]
EXPLAIN_FORMS = [
    "Explain what this Python code does, line by line:\n```python\n{code}```",
    "What is the time complexity of this function? Explain.\n```python\n{code}```",
    "Add helpful comments to this code:\n```python\n{code}```",
    "Rewrite this function to be more readable and add a docstring:\n```python\n{code}```",
    "Convert this Python function to {lang}:\n```python\n{code}```",
    "Write pytest unit tests for this function:\n```python\n{code}```",
    "Review this code and suggest improvements:\n```python\n{code}```",
    "Add type hints to this function:\n```python\n{code}```",
    "What happens if this function gets an empty input? \n```python\n{code}```",
]
FIX_FORMS = [
    "This function should {task}, but it gives wrong results. Find and fix the bug:\n```python\n{code}```",
    "There is a bug in this code. It is supposed to {task}. What is wrong?\n```python\n{code}```",
    "My function is meant to {task}. Can you fix it and explain the mistake?\n```python\n{code}```",
    "Debug this Python code (it should {task}):\n```python\n{code}```",
]


def _buggy(code: str, r: random.Random) -> str | None:
    options = [(a, b) for a, b in BUGS if a in code]
    if not options:
        return None
    a, b = r.choice(options)
    return code.replace(a, b, 1)


def _verb(task: str) -> str:
    """'returns the x' -> 'return the x' (for 'it should {task}')."""
    first, _, rest = task.partition(" ")
    if first.endswith("es") and first[:-2].endswith(("ch", "sh", "x", "ss")):
        return first[:-2] + " " + rest
    return (first[:-1] if first.endswith("s") else first) + " " + rest


def gen_code(r: random.Random) -> str:
    k = r.random()
    if k < 0.6:
        return (r.choice(WRITE_FORMS).format(lang=r.choice(LANGUAGES), task=r.choice(CODE_TASKS))
                + r.choice(CODE_CONSTRAINTS))
    task, code = r.choice(SNIPPETS)
    if k < 0.8:
        return r.choice(EXPLAIN_FORMS).format(code=code, lang=r.choice(LANGUAGES[6:]))
    bad = _buggy(code, r)
    if bad is None:
        return r.choice(EXPLAIN_FORMS).format(code=code, lang=r.choice(LANGUAGES[6:]))
    return r.choice(FIX_FORMS).format(task=_verb(task), code=bad)


# ---------------------------------------------------------------- math
ITEMS = [("notebook", "notebooks"), ("apple", "apples"), ("ticket", "tickets"), ("pencil", "pencils"),
         ("plant", "plants"), ("book", "books"), ("sticker", "stickers"), ("muffin", "muffins"),
         ("marble", "marbles"), ("candle", "candles"), ("bottle of juice", "bottles of juice")]
ASK = [" Solve it step by step.", " Show your work step by step.", " Explain each step.",
       " Think step by step and give the final answer at the end.",
       " Walk me through the solution.", " Please show the steps."]


def _money(x: float) -> str:
    return f"${x:.2f}" if x != int(x) else f"${int(x)}"


def math_problem(r: random.Random) -> tuple[str, str]:
    """One word problem with fresh numbers -> (question, worked solution)."""
    n = person(r).split()[0]
    k = r.randrange(10)
    if k == 0:
        item, items = r.choice(ITEMS)
        q, p, d = r.randint(3, 15), r.randint(2, 12), r.choice([10, 15, 20, 25])
        tot = q * p
        return (f"{n} buys {q} {items} at {_money(p)} each and gets a {d}% discount on the "
                f"total. How much does {n} pay?",
                f"The total before the discount is {q} x {_money(p)} = {_money(tot)}. The "
                f"discount is {d}% of {_money(tot)} = {_money(tot * d / 100)}. {n} pays "
                f"{_money(tot)} - {_money(tot * d / 100)} = {_money(tot * (100 - d) / 100)}.")
    if k == 1:
        v, t = r.randint(30, 110), r.randint(2, 9)
        h = r.choice([15, 30, 45])
        dist = v * t + v * h / 60
        return (f"A train travels at {v} km/h for {t} hours and {h} minutes. How far does it go?",
                f"{h} minutes is {h / 60:g} hours, so the time is {t + h / 60:g} hours. The "
                f"distance is {v} x {t + h / 60:g} = {dist:g} km.")
    if k == 2:
        s, w, goal = r.randint(5, 40), r.randint(2, 6), r.randint(200, 900)
        weeks = -(-max(0, goal - s * w) // s)
        return (f"{n} saves {_money(s)} every week and has already saved for {w} weeks. How "
                f"many more weeks until {n} has at least {_money(goal)}?",
                f"After {w} weeks {n} has {s} x {w} = {_money(s * w)}. {n} still needs "
                f"{_money(goal)} - {_money(s * w)} = {_money(goal - s * w)}. At {_money(s)} a week "
                f"that takes {weeks} more weeks (rounding up).")
    if k == 3:
        item, items = r.choice(ITEMS)
        total, kids = r.randint(20, 200), r.randint(3, 9)
        return (f"{n} has {total} {items} to share equally among {kids} friends. How many does "
                f"each friend get, and how many are left over?",
                f"{total} divided by {kids} is {total // kids} with a remainder of {total % kids}. "
                f"Each friend gets {total // kids} {items} and {total % kids} are left over.")
    if k == 4:
        a, b, cover, price = r.randint(3, 8), r.randint(3, 8), r.choice([8, 10, 12]), r.randint(15, 40)
        area = a * b
        cans = -(-area // cover)
        return (f"A room's floor is {a} m by {b} m. One can of floor paint covers {cover} square "
                f"metres and costs {_money(price)}. How much does it cost to paint the floor?",
                f"The area is {a} x {b} = {area} m2. {area} / {cover} = {area / cover:.2f}, so "
                f"{cans} cans are needed. They cost {cans} x {_money(price)} = {_money(cans * price)}.")
    if k == 5:
        old, p = r.randint(40, 400), r.choice([5, 8, 10, 12, 20, 25, 30])
        up = r.random() < 0.5
        new = old * (100 + p) / 100 if up else old * (100 - p) / 100
        return (f"A {r.choice(['bike', 'jacket', 'lamp', 'tent', 'chair'])} cost {_money(old)}. "
                f"Its price {'rose' if up else 'fell'} by {p}%. What is the new price?",
                f"{p}% of {_money(old)} is {_money(old * p / 100)}. The new price is {_money(old)} "
                f"{'+' if up else '-'} {_money(old * p / 100)} = {_money(new)}.")
    if k == 6:
        a, diff, yrs = r.randint(6, 15), r.randint(20, 35), r.randint(3, 12)
        return (f"{n} is {a} years old and {n}'s mother is {diff} years older. How old will they "
                f"be together in {yrs} years?",
                f"{n}'s mother is {a} + {diff} = {a + diff}. In {yrs} years {n} will be {a + yrs} "
                f"and the mother {a + diff + yrs}, together {a + yrs + a + diff + yrs} years.")
    if k == 7:
        ad, ch, na, nc = r.randint(8, 20), r.randint(4, 10), r.randint(1, 4), r.randint(1, 5)
        return (f"Museum tickets cost {_money(ad)} for adults and {_money(ch)} for children. A "
                f"family of {na} adults and {nc} children visits. What do they pay?",
                f"Adults: {na} x {_money(ad)} = {_money(na * ad)}. Children: {nc} x {_money(ch)} = "
                f"{_money(nc * ch)}. Total: {_money(na * ad + nc * ch)}.")
    if k == 8:
        scores = [r.randint(55, 100) for _ in range(r.randint(3, 6))]
        return (f"{n}'s test scores are {', '.join(map(str, scores))}. What is the average score?",
                f"The sum is {' + '.join(map(str, scores))} = {sum(scores)}. There are "
                f"{len(scores)} tests, so the average is {sum(scores)} / {len(scores)} = "
                f"{sum(scores) / len(scores):.2f}.")
    hh, mm, dur = r.randint(6, 11), r.choice([0, 15, 30, 45]), r.randint(50, 400)
    end = hh * 60 + mm + dur
    return (f"A {r.choice(['bus ride', 'baking session', 'hike', 'meeting', 'film marathon'])} "
            f"starts at {hh}:{mm:02d} and lasts {dur} minutes. When does it end?",
            f"{dur} minutes is {dur // 60} hours and {dur % 60} minutes. {hh}:{mm:02d} plus that "
            f"is {end // 60}:{end % 60:02d}.")


def gen_math(r: random.Random) -> str:
    return math_problem(r)[0] + r.choice(ASK)


# ---------------------------------------------------------------- passages
EVENTS = ["opened a new public library", "finished repairing the old stone bridge",
          "held its first food festival", "started a bike-sharing program",
          "planted a thousand trees along the river", "opened a community swimming pool",
          "launched an evening bus line", "hosted a regional robotics competition for schools",
          "converted an old factory into artist studios", "built a new playground in the park"]
PRODUCTS = [("backpack", ["water-resistant fabric", "a padded laptop sleeve", "two side pockets", "reflective strips"]),
            ("electric kettle", ["a 1.7-litre capacity", "five temperature settings", "a keep-warm mode", "auto shut-off"]),
            ("desk lamp", ["three brightness levels", "a USB charging port", "an adjustable arm", "a warm light mode"]),
            ("pair of hiking boots", ["a waterproof membrane", "a grippy rubber sole", "ankle support", "a breathable lining"]),
            ("wireless speaker", ["twelve hours of battery", "a splash-proof case", "a built-in microphone", "deep bass"]),
            ("office chair", ["lumbar support", "adjustable armrests", "a mesh back", "a five-year warranty"]),
            ("blender", ["a glass jar", "six speeds", "a pulse button", "dishwasher-safe blades"])]
SPECIES_ADJ = ["spotted", "silver", "crested", "long-tailed", "striped", "dwarf", "golden"]
SPECIES_KIND = [("tree frog", "amphibian", "insects"), ("river shrew", "mammal", "water snails"),
                ("finch", "bird", "seeds"), ("cave beetle", "insect", "fungi"),
                ("rock lizard", "reptile", "ants"), ("marsh vole", "mammal", "grasses")]
HABITATS = ["damp forests", "mountain streams", "coastal dunes", "high meadows", "limestone caves", "river deltas"]
DISHES = [("lentil soup", ["red lentils", "onion", "carrots", "cumin", "vegetable stock"]),
          ("vegetable stir-fry", ["broccoli", "peppers", "soy sauce", "garlic", "rice"]),
          ("banana pancakes", ["bananas", "eggs", "flour", "milk", "butter"]),
          ("tomato pasta", ["pasta", "tomatoes", "olive oil", "basil", "garlic"]),
          ("chickpea salad", ["chickpeas", "cucumber", "lemon", "parsley", "feta"])]
TEAMS = ["marketing", "design", "support", "data", "platform", "sales", "research"]
DECISIONS = ["move the launch to the following month", "hire two more testers", "switch to weekly releases",
             "run a customer survey", "cut the budget for travel", "adopt a shared style guide",
             "open a second help desk shift", "pilot the new onboarding flow"]
RULES = ["Bags must be left in the lockers.", "Food is allowed only in the café area.",
         "Members may bring one guest per visit.", "Phones must be on silent.",
         "Equipment must be wiped down after use.", "Rooms can be booked up to two weeks ahead.",
         "Children under twelve must be accompanied by an adult.", "Late returns cost 50 cents a day."]
PLACES = ["the old town", "the harbour", "the botanical garden", "the castle ruins", "the market hall",
          "the river walk", "the science museum", "the hilltop viewpoint", "the lake shore"]


def passage(r: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    """A fictional passage -> (kind, text, [(question, answer)]) with its facts."""
    k = r.randrange(10)
    p1, p2, t = person(r), person(r), town(r)
    d, yr, num = date(r), r.randint(1990, 2023), r.randint(12, 950)
    if k == 0:
        ev, cost = r.choice(EVENTS), r.randint(2, 40) / 10
        text = (f"On {d}, the town of {t} {ev}. The project cost {cost:g} million dollars and took "
                f"{r.randint(8, 30)} months to complete. Mayor {p1} said the town had waited a long "
                f"time for it and thanked the {num} volunteers who helped. Local business owner {p2} "
                f"expects more visitors on weekends. A celebration is planned for the following "
                f"{r.choice(DAYS)}, with music and free entry for children.")
        return "news article", text, [("How much did the project cost?", f"{cost:g} million dollars"),
                                      ("Who is the mayor?", p1), ("How many volunteers helped?", str(num)),
                                      ("What happened in the town?", ev)]
    if k == 1:
        prod, feats = r.choice(PRODUCTS)
        brand, price = r.choice(PRE) + r.choice(["ware", "tek", "line", "craft"]), r.randint(19, 240)
        fs = r.sample(feats, 3)
        text = (f"The {brand} {prod} is designed for everyday use. It has {fs[0]}, {fs[1]} and "
                f"{fs[2]}. It comes in {r.choice(['three', 'four', 'five'])} colours and weighs "
                f"{r.randint(2, 30) / 10:g} kg. The {prod} costs ${price} and ships with a "
                f"{r.choice([1, 2, 3])}-year warranty. Reviewers praise its build quality but "
                f"note that {r.choice(['the instructions are brief', 'stock is limited', 'the box is bulky'])}.")
        return "product description", text, [("How much does it cost?", f"${price}"),
                                             ("Name one feature.", fs[0]), ("Who makes it?", brand)]
    if k == 2:
        team, dec = r.choice(TEAMS), r.sample(DECISIONS, 2)
        text = (f"Meeting notes, {team} team, {d}. Attendees: {p1}, {p2} and {person(r)}. The team "
                f"reviewed last quarter's results: {num} tickets were closed, up {r.randint(3, 40)}% "
                f"from the quarter before. Decisions: {dec[0]}; {dec[1]}. Action items: {p1} will "
                f"draft a plan by {date(r)}; {p2} will share the numbers with the other teams. The "
                f"next meeting is on {r.choice(DAYS)}.")
        return "set of meeting notes", text, [("Who will draft the plan?", p1),
                                              ("How many tickets were closed?", str(num)),
                                              ("What was decided?", f"{dec[0]}; {dec[1]}")]
    if k == 3:
        place = r.choice(PLACES)
        text = (f"Hi {p2.split()[0]},\n\nI hope you are well. I am organising the team outing to "
                f"{place} in {t} on {d}. We will meet at {r.randint(8, 11)}:{r.choice(['00', '30'])} "
                f"at the main entrance. Could you book a table for {r.randint(6, 20)} people for "
                f"lunch and send me the total cost by {r.choice(DAYS)}? The budget is ${num} for "
                f"the whole day. Let me know if anyone has dietary requirements.\n\nThanks,\n{p1}")
        return "e-mail", text, [("Who wrote the e-mail?", p1), ("Where is the outing?", f"{place} in {t}"),
                                ("What is the budget?", f"${num}")]
    if k == 4:
        adj, (kind, cls, food) = r.choice(SPECIES_ADJ), r.choice(SPECIES_KIND)
        name = f"{t} {adj} {kind}"
        hab = r.choice(HABITATS)
        text = (f"The {name} is a small {cls} found only in the {hab} around {t}. It was first "
                f"described in {yr} by the naturalist {p1}. Adults grow to about {r.randint(3, 30)} "
                f"centimetres and live for up to {r.randint(2, 12)} years. The {kind} feeds mainly on "
                f"{food} and is most active at {r.choice(['dawn', 'dusk', 'night'])}. Its numbers "
                f"have fallen by {r.randint(10, 60)}% since {yr + r.randint(5, 20)}, mostly because of "
                f"habitat loss.")
        return "encyclopedia entry", text, [("What does it eat?", food), ("Where does it live?", hab),
                                            ("Who first described it?", p1), ("When was it first described?", str(yr))]
    if k == 5:
        dish, ing = r.choice(DISHES)
        serv, mins = r.randint(2, 6), r.randint(15, 60)
        text = (f"{dish.capitalize()} (serves {serv}, ready in {mins} minutes). Ingredients: "
                f"{', '.join(ing)}. Step 1: prepare the {ing[0]} and {ing[1]}. Step 2: cook the "
                f"{ing[1]} for {r.randint(3, 10)} minutes over medium heat. Step 3: add the "
                f"{ing[2]} and {ing[3]} and stir well. Step 4: finish with the {ing[4]} and serve warm.")
        return "recipe", text, [("How many people does it serve?", str(serv)),
                                ("How long does it take?", f"{mins} minutes"),
                                ("What are the ingredients?", ", ".join(ing))]
    if k == 6:
        job, org = r.choice(["engineer", "teacher", "nurse", "architect", "chef", "translator"]), town(r) + " " + r.choice(["Works", "Institute", "Labs", "Cooperative"])
        text = (f"{p1} was born in {t} in {yr - 30}. After studying {r.choice(['physics', 'history', 'design', 'biology', 'economics'])} "
                f"at university, {p1.split()[0]} worked as a {job} for {r.randint(4, 15)} years. In "
                f"{yr}, {p1.split()[0]} founded {org}, which now employs {num} people. {p1.split()[0]} "
                f"has written {r.randint(2, 9)} books and won the {t} Prize in {yr - r.randint(1, 9)}.")
        return "short biography", text, [("Where was the person born?", t), ("What did they found?", org),
                                         ("How many people does the organisation employ?", str(num))]
    if k == 7:
        venue = f"{t} {r.choice(['Community Gym', 'Public Library', 'Coworking Space', 'Swimming Centre'])}"
        rules = r.sample(RULES, 4)
        text = (f"Notice to all members of the {venue}. From {d}, the following rules apply. "
                + " ".join(rules) + f" Opening hours are {r.randint(6, 9)} am to {r.randint(8, 11)} pm. "
                f"Questions can be sent to the manager, {p1}.")
        return "notice", text, [("Who is the manager?", p1), ("When do the rules start?", d),
                                ("Name one rule.", rules[0])]
    if k == 8:
        prod, feats = r.choice(PRODUCTS)
        stars = r.randint(1, 5)
        text = (f"Review by {p1}, {stars} out of 5 stars. I bought this {prod} {r.randint(2, 11)} "
                f"months ago. The good: I like {r.choice(feats)}, and delivery took only "
                f"{r.randint(2, 6)} days. The bad: {r.choice(['it scratches easily', 'it is louder than expected', 'the colour faded', 'customer service was slow'])}. "
                f"Overall I {'would' if stars >= 3 else 'would not'} recommend it to a friend.")
        return "customer review", text, [("How many stars did the reviewer give?", str(stars)),
                                         ("Who wrote the review?", p1)]
    places, month, day = r.sample(PLACES, 3), r.choice(MONTHS), r.randint(1, 25)
    text = (f"Itinerary for {p1}'s trip to {t}, {month} {day} to {month} {day + 2}. Day 1: arrive by train at "
            f"{r.randint(9, 17)}:00, check in at the {town(r)} Hotel, walk to {places[0]}. Day 2: "
            f"guided tour of {places[1]} (tickets ${r.randint(8, 40)}), dinner with {p2}. Day 3: "
            f"morning at {places[2]}, depart at {r.randint(12, 19)}:30. Total budget: ${num}.")
    return "travel itinerary", text, [("Where does the trip go?", t), ("Who is dinner with?", p2),
                                      ("What is the total budget?", f"${num}")]


SUMMARY_FORMS = [
    "Summarize the following {kind} in two sentences:\n\n{p}", "Write a one-sentence summary of this {kind}.\n\n{p}",
    "Give me the key points of this {kind} as bullet points:\n\n{p}", "TL;DR:\n\n{p}",
    "Summarize this {kind} for a busy manager:\n\n{p}", "Write a headline for this {kind}:\n\n{p}",
    "{p}\n\nSummarize the text above in about 30 words.", "Condense this {kind} into three bullet points:\n\n{p}",
    "Explain this {kind} to a child in a few simple sentences:\n\n{p}",
    "Rewrite this {kind} in a more formal tone:\n\n{p}", "Shorten this {kind} to half its length:\n\n{p}",
]
QA_FORMS = [
    "Read the passage and answer the question.\n\nPassage:\n{p}\n\nQuestion: {q}",
    "Based only on the text below, answer: {q}\n\n{p}", "{p}\n\n{q} Answer using the text.",
    "Answer the question using the {kind} below. Quote the sentence you used.\n\n{p}\n\nQuestion: {q}",
]
EXTRACT_FORMS = [
    "Extract all the names, dates and numbers from this {kind} as a list:\n\n{p}",
    "List every person mentioned in this {kind} and their role:\n\n{p}",
    "Turn the key facts of this {kind} into a JSON object:\n\n{p}",
    "Make a table of the facts in this {kind}:\n\n{p}",
    "Write three questions a reader could answer from this {kind}, with the answers:\n\n{p}",
    "Which sentences of this {kind} mention a number? Copy them.\n\n{p}",
]
SENT_FORMS = ["{n} is going to {place} on {day} to meet {m}.", "The meeting has been moved to {day} at {h} o'clock.",
              "Could you tell me where {place} is?", "We need {k} more chairs for the party on {day}.",
              "My flight to {t} leaves at {h}:30 tomorrow morning.", "{n} forgot the keys at {place} again.",
              "Please send me the report before {day}.", "The weather in {t} will be sunny all week.",
              "I would like to book a table for {k} people tonight.", "The museum is closed on {day}s."]
TRANSLATE_FORMS = ["Translate into {lang}: {s}", "How do you say \"{s}\" in {lang}?",
                   "Translate the following text into {lang}:\n\n{s}", "Please translate this into {lang} and keep the meaning exact:\n\n{s}",
                   "Translate this {kind} into {lang}:\n\n{s}", "Give me the {lang} version of this text:\n\n{s}"]


def gen_summarize(r: random.Random) -> str:
    kind, text, _ = passage(r)
    return r.choice(SUMMARY_FORMS).format(kind=kind, p=text)


def gen_passage_qa(r: random.Random) -> str:
    kind, text, facts = passage(r)
    if r.random() < 0.6:
        return r.choice(QA_FORMS).format(kind=kind, p=text, q=r.choice(facts)[0])
    return r.choice(EXTRACT_FORMS).format(kind=kind, p=text)


def gen_translate(r: random.Random) -> str:
    lang = r.choice(LANGS)
    if r.random() < 0.5:
        s = r.choice(SENT_FORMS).format(n=r.choice(FIRST), m=r.choice(FIRST), place=r.choice(PLACES),
                                        day=r.choice(DAYS), h=r.randint(1, 12), k=r.randint(2, 12), t=town(r))
        return r.choice(TRANSLATE_FORMS[:4]).format(lang=lang, s=s)
    kind, text, _ = passage(r)
    sents = re.split(r"(?<=[.!?])\s+", text)
    part = " ".join(sents[:r.randint(1, 3)]) if r.random() < 0.6 else text
    return r.choice(TRANSLATE_FORMS[2:]).format(lang=lang, s=part, kind=kind)


# ---------------------------------------------------------------- multi-turn
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


def heldout_texts(path: Path = HELDOUT_FILE) -> set[str]:
    """The normalized user texts of the held-out prompts."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            msgs = obj.get("messages") or [{"role": "user", "content": obj["prompt"]}]
            out.update(normalize(m["content"]) for m in msgs if m["role"] == "user")
    return out


def conversation(rec: dict) -> list[dict]:
    """A record's messages (a `prompt` record as one user turn)."""
    return rec["messages"] if "messages" in rec else [{"role": "user", "content": rec["prompt"]}]


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
    ap.add_argument("--out", default=str(HERE / "prompt_set.jsonl"))
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
