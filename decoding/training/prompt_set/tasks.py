"""Instruction, code and math prompts: instructions and open questions over a topic list,
code to write / explain / fix (a snippet with an injected bug), word problems with fresh
numbers that ask for step-by-step answers.

Part of the #24 prompt set (build.py assembles it; its docstring says why).
"""

from __future__ import annotations

import random

from .slots import person


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
