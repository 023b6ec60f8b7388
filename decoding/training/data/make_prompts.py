"""Writes train_prompts.jsonl: chat/programming task prompts for self-distilling draft heads.

Combinatorial from hand-written lists (no evaluation set is used: not HumanEval, not
MT-bench, not Spec-Bench). Deterministic: `python decoding/training/data/make_prompts.py`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

PY_TASKS = [
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a string", "removes duplicates from a list while keeping order",
    "flattens a nested list", "merges two sorted lists", "finds the maximum value in a dictionary",
    "computes the factorial of a number", "checks whether a string is a palindrome",
    "converts Celsius to Fahrenheit", "sums the digits of an integer", "finds the second largest number in a list",
    "counts word frequencies in a text", "returns the common elements of two lists",
    "checks whether two strings are anagrams", "capitalizes the first letter of every word",
    "computes the greatest common divisor of two numbers", "computes the least common multiple of two numbers",
    "converts a decimal number to binary", "converts a binary string to an integer",
    "finds all even numbers in a list", "splits a list into chunks of size n", "rotates a list by k positions",
    "computes the average of a list of numbers", "computes the median of a list", "finds the mode of a list",
    "reads a text file and counts its lines", "writes a list of strings to a file",
    "parses a CSV file into a list of dictionaries", "validates an email address with a regular expression",
    "returns the longest word in a sentence", "checks whether a year is a leap year",
    "generates a random password", "transposes a matrix", "multiplies two matrices",
    "performs binary search on a sorted list", "implements bubble sort", "implements insertion sort",
    "implements merge sort", "implements quicksort", "implements selection sort",
    "counts the occurrences of each character in a string", "removes all whitespace from a string",
    "checks whether a list is sorted", "finds the index of the smallest element in a list",
    "returns the unique characters in a string", "converts a list of tuples into a dictionary",
    "inverts a dictionary", "sorts a dictionary by its values", "groups words by their first letter",
    "computes the power set of a list", "generates all permutations of a string",
    "computes the running sum of a list", "finds the missing number in a list from 1 to n",
    "checks whether parentheses in a string are balanced", "converts a Roman numeral to an integer",
    "converts an integer to a Roman numeral", "computes compound interest",
    "computes the area of a circle", "computes the distance between two points",
    "checks whether a number is a perfect square", "checks whether a number is an Armstrong number",
    "returns the prime factors of a number", "lists all primes below n using a sieve",
    "counts the number of words in a sentence", "reverses the order of words in a sentence",
    "truncates a string to a maximum length with an ellipsis", "pads a number with leading zeros",
    "formats a number with thousands separators", "converts a string to snake_case",
    "converts a string to camelCase", "extracts all numbers from a string", "extracts all URLs from a text",
    "counts the number of uppercase letters in a string", "replaces every vowel in a string with '*'",
    "finds the first non-repeating character in a string", "compresses a string using run-length encoding",
    "decodes a run-length encoded string", "implements a simple stack class", "implements a queue class",
    "implements a linked list with append and remove", "implements a binary search tree insert and search",
    "computes the depth of a binary tree", "checks whether a graph has a cycle",
    "performs breadth-first search on a graph", "performs depth-first search on a graph",
    "finds the shortest path in an unweighted graph", "implements a least-recently-used cache",
    "memoizes a recursive function", "measures the execution time of another function",
    "retries a function call up to three times", "reads a JSON file and returns its contents",
    "writes a dictionary to a JSON file", "downloads a web page with the requests library",
    "lists all files in a directory with a given extension", "renames all files in a folder",
    "computes the size of a directory", "converts a date string to a datetime object",
    "returns the number of days between two dates", "returns the day of the week for a date",
    "checks whether a string contains only digits", "shuffles a list", "picks a random element from a list",
    "returns the n largest elements of a list", "finds pairs in a list that sum to a target",
    "computes the dot product of two vectors", "normalizes a list of numbers to the range 0 to 1",
    "computes the standard deviation of a list", "counts the lines of code in a Python file",
    "removes punctuation from a string", "checks whether a sentence is a pangram",
    "converts a list of strings to uppercase", "filters out None values from a list",
    "merges two dictionaries", "deep-copies a nested dictionary", "finds the longest common prefix of strings",
    "finds the longest increasing subsequence", "solves the two-sum problem",
    "computes the edit distance between two strings", "checks whether a number is a power of two",
    "counts the set bits in an integer", "swaps two variables without a temporary variable",
    "computes the sum of a list recursively", "returns the Collatz sequence of a number",
    "generates Pascal's triangle", "prints a multiplication table", "implements FizzBuzz",
    "validates a phone number", "masks all but the last four digits of a credit card number",
    "converts seconds to hours, minutes and seconds", "parses a query string into a dictionary",
    "builds a URL from a base and parameters", "checks whether a port is open on a host",
    "zips two lists into a dictionary", "finds the intersection of several sets",
    "computes a moving average", "implements a simple tokenizer for arithmetic expressions",
    "evaluates a postfix expression", "converts infix to postfix notation",
    "counts the islands in a grid", "rotates a matrix by 90 degrees", "checks whether a sudoku row is valid",
    "generates the first n triangular numbers", "calculates the body mass index",
    "computes the checksum of a file with hashlib", "reads environment variables with defaults",
    "logs messages to a file with the logging module", "parses command-line arguments with argparse",
]
PY_FORMS = [
    "Write a Python function that {t}.", "Write a Python function that {t}. Include a short docstring.",
    "How would you write a Python function that {t}?", "Show me Python code that {t}.",
]
OTHER_LANG = [
    ("JavaScript", "reverses a string"), ("JavaScript", "removes duplicates from an array"),
    ("JavaScript", "debounces a function"), ("JavaScript", "fetches JSON from a URL"),
    ("SQL", "selects the ten most recent orders"), ("SQL", "counts customers per country"),
    ("Bash", "counts the files in a directory"), ("Bash", "renames all .txt files to .md"),
    ("C", "computes the length of a string"), ("Java", "checks whether a number is prime"),
    ("Go", "reads a file line by line"), ("Rust", "sums a vector of integers"),
]
CONCEPTS = [
    "recursion", "a hash table", "object-oriented programming", "a closure in Python",
    "list comprehensions in Python", "Python decorators", "generators in Python", "the GIL in Python",
    "Big O notation", "a linked list", "a binary search tree", "dynamic programming", "a REST API",
    "HTTP status codes", "what a database index is", "SQL joins", "version control with Git",
    "a merge conflict in Git", "unit testing", "continuous integration", "a virtual environment in Python",
    "the difference between a list and a tuple in Python", "exceptions and try/except in Python",
    "type hints in Python", "asynchronous programming with async and await", "multithreading",
    "a race condition", "a deadlock", "garbage collection", "a compiler versus an interpreter",
    "what an API is", "JSON", "regular expressions", "a stack and a queue", "the difference between TCP and UDP",
    "DNS", "what a container is", "machine learning", "a neural network", "overfitting",
    "gradient descent", "what a large language model is", "encryption", "public-key cryptography",
    "a hash function", "cloud computing", "caching", "a memory leak", "functional programming",
    "immutability", "mutable default arguments in Python", "the difference between == and is in Python",
    "*args and **kwargs in Python", "context managers in Python", "dataclasses in Python",
    "photosynthesis", "the water cycle", "gravity", "inflation in economics", "supply and demand",
    "compound interest", "climate change", "how vaccines work", "the theory of evolution",
    "how the internet works", "what a black hole is", "the difference between weather and climate",
    "how a bill becomes a law", "the scientific method", "what DNA is", "how batteries work",
]
CONCEPT_FORMS = [
    "Explain {c}.", "Explain {c} in simple terms.", "Can you explain {c} with an example?",
    "Give me a short explanation of {c}.", "Explain {c} to a beginner.",
]
CHAT = [
    "What is a good way to start learning programming?", "How can I improve my sleep?",
    "Give me three tips for staying focused while studying.", "What should I pack for a weekend hiking trip?",
    "How do I make a simple tomato pasta sauce?", "What are some healthy breakfast ideas?",
    "How can I save money on groceries?", "Suggest a name for a small coffee shop.",
    "What are the benefits of regular exercise?", "How do I politely decline an invitation?",
    "Write a short thank-you note to a colleague who helped me.", "How do I prepare for a job interview?",
    "What are some good habits for a productive morning?", "How do I take care of a houseplant?",
    "Give me a simple recipe for pancakes.", "What are some fun things to do on a rainy day?",
    "How can I reduce stress at work?", "What is the best way to learn a new language?",
    "Write a short poem about the ocean.", "Write a haiku about autumn.",
    "Tell me a fun fact about space.", "How do I write a good resume?",
    "What are some tips for public speaking?", "How can I be more organized?",
    "Write a short story about a robot who learns to paint.", "How do I make a budget?",
    "What should I consider when buying a laptop?", "How do I start running as a beginner?",
    "What are some easy vegetables to grow at home?", "Summarize the benefits of reading books.",
    "How do I write a professional email asking for a deadline extension?",
    "What are some good questions to ask at the end of an interview?",
    "Give me a list of five classic novels worth reading.", "How can I drink more water during the day?",
    "What is the difference between a virus and a bacterium?", "How does a refrigerator keep food cold?",
    "Why is the sky blue?", "How many planets are in the solar system? Name them.",
    "What causes the seasons on Earth?", "How do I boil an egg?", "How do I change a flat tire?",
    "What are good ways to make new friends in a new city?", "How can I become a better listener?",
    "Write a short birthday message for my sister.", "Give me ideas for a team-building activity.",
    "What is a healthy amount of screen time?", "How do I clean a cast-iron pan?",
    "What are the main food groups?", "Suggest a weekly workout plan for a beginner.",
    "How do I calm down before an exam?", "What are the pros and cons of working from home?",
    "How do I write a cover letter?", "Give me tips for taking better photos with my phone.",
    "What is the capital of Australia, and what is it known for?", "How do I remove a coffee stain?",
    "Write a limerick about a cat.", "Explain the rules of chess briefly.",
    "What should I do if I feel unmotivated?", "How do airplanes stay in the air?",
    "Recommend a few board games for a family evening.", "How do I plan a trip on a budget?",
    "What are some simple ways to reduce plastic waste?", "How do I make a cup of good coffee?",
    "Give me a short motivational quote and explain it.", "How do I keep a journal?",
    "What is mindfulness?", "How can I improve my handwriting?", "Write a short product description for a water bottle.",
    "How do I ask my manager for feedback?", "What are the signs of dehydration?",
    "How do I teach a child to ride a bike?", "What is the difference between a latte and a cappuccino?",
    "Write an email inviting friends to a dinner party.", "How do I set goals I can actually achieve?",
    "Give me five icebreaker questions for a meeting.", "What are some tips for a long flight?",
    "How do I write a good summary of an article?", "Compare cats and dogs as pets.",
    "What is a balanced diet?", "How do I prepare for a marathon?", "How do I back up my phone?",
    "What is the difference between RAM and storage?", "How do I create a strong password?",
    "How do I speed up a slow computer?", "What is two-factor authentication?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Write a short apology message for missing a meeting.", "How do I negotiate a higher salary?",
    "Give me a quick history of the bicycle.", "What are some good stretches for back pain?",
    "How do I meal prep for a week?", "Write a tweet announcing a new blog post about Python.",
    "How do I get better at math?", "What are good study techniques for memorizing facts?",
]
PY_QUESTIONS = [
    "How do I sort a list of dictionaries by a key in Python?", "How do I read a file line by line in Python?",
    "How do I reverse a list in Python?", "How do I check if a key exists in a dictionary?",
    "How do I convert a string to an integer in Python?", "How do I remove an item from a list in Python?",
    "How do I iterate over a dictionary in Python?", "How do I format strings in Python?",
    "How do I handle exceptions in Python?", "How do I install a package with pip?",
    "How do I create a virtual environment?", "How do I use enumerate in Python?",
    "How do I use zip in Python?", "How do I split a string in Python?", "How do I join a list of strings?",
    "How do I get the current date and time in Python?", "How do I write a class in Python?",
    "How do I copy a list in Python?", "How do I check the type of a variable in Python?",
    "How do I measure how long my Python code takes to run?", "How do I make an HTTP request in Python?",
    "How do I read a CSV file with pandas?", "How do I plot a line chart with matplotlib?",
    "How do I write unit tests with pytest?", "How do I use a lambda function in Python?",
    "How do I use map and filter in Python?", "How do I merge two dictionaries in Python?",
    "How do I find the length of a list?", "How do I generate random numbers in Python?",
    "How do I sort a list in descending order?", "What is the difference between append and extend?",
    "What does `if __name__ == '__main__':` do?", "What is the difference between a set and a list?",
    "Why does my Python code raise an IndentationError?", "What does a KeyError mean in Python?",
    "How do I fix 'ModuleNotFoundError' in Python?", "How do I debug a Python program?",
    "How do I use git to undo my last commit?", "How do I create a new branch in git?",
    "What is the difference between git merge and git rebase?",
]
COMPARE = [
    ("a list", "a tuple"), ("a process", "a thread"), ("SQL", "NoSQL databases"), ("Python", "JavaScript"),
    ("compiled", "interpreted languages"), ("HTTP", "HTTPS"), ("RAM", "ROM"), ("a stack", "a heap"),
    ("supervised", "unsupervised learning"), ("a class", "an object"), ("a function", "a method"),
    ("weather", "climate"), ("a virus", "a bacterium"), ("stocks", "bonds"), ("tea", "coffee"),
]

# Round 2: everyday chat, broader than the templates above (the first heads did much worse
# on general chat prompts than on held-out template prompts: 20% vs 38% head-1 top-1).
HOW_TO = [
    "cook rice on the stove", "fix a leaky faucet", "train a puppy to sit", "iron a shirt",
    "start a vegetable garden", "write a thank-you letter", "make cold brew coffee",
    "clean my laptop keyboard", "choose a good watermelon", "tie a tie", "make a paper airplane",
    "remove rust from tools", "unclog a drain", "paint a room", "sharpen a kitchen knife",
    "start meditating", "write a haiku", "make friends as an adult", "organize my closet",
    "fold a fitted sheet", "take notes in a lecture", "prepare for a road trip",
    "care for a sourdough starter", "make a smoothie", "pack a suitcase efficiently",
    "keep cut flowers fresh", "get rid of fruit flies", "read faster", "stop procrastinating",
    "write a speech for a wedding", "make homemade pizza dough", "jump-start a car",
    "learn to swim as an adult", "build a campfire safely", "cook a steak",
    "brew green tea properly", "make a simple salad dressing", "wash a wool sweater",
    "calm a crying baby", "set up a home Wi-Fi network", "choose running shoes",
    "write a short bio for a website", "plan a birthday party", "store fresh herbs",
    "save for retirement", "improve my posture", "memorize a speech", "start a podcast",
    "make scrambled eggs", "decorate a small room", "prepare for a power outage",
]
TIPS = [
    "traveling with kids", "working night shifts", "learning to draw", "hosting a dinner party",
    "moving to a new city", "camping for the first time", "studying for a math exam",
    "writing a novel", "saving energy at home", "eating less sugar", "keeping a cat happy indoors",
    "running a marathon", "reducing screen time", "managing a small team", "buying a used car",
    "flying with a pet", "learning to cook", "staying warm in winter", "keeping cool in summer",
    "teaching kids to read", "public transport in a big city", "writing clear emails",
    "taking care of succulents", "starting a small business", "working out at home",
    "being a good roommate", "learning vocabulary in a new language", "preparing for a hike",
]
WHY = [
    "Why do leaves change color in autumn?", "Why is the ocean salty?", "Why do we dream?",
    "Why do cats purr?", "Why does soda fizz?", "Why does ice float on water?",
    "Why do we get goosebumps?", "Why do onions make us cry?", "Why does the moon have phases?",
    "Why do we yawn?", "Why does metal feel colder than wood?", "Why do birds migrate?",
    "Why does popcorn pop?", "Why do we have fingerprints?", "Why does thunder follow lightning?",
    "Why do bees make honey?", "Why does coffee keep people awake?",
    "Why are some people left-handed?", "Why do airplanes leave white trails?",
    "Why does milk go sour?", "Why do we need sleep?", "Why do stars twinkle?",
    "Why is the sea level rising?", "Why do my ears pop on a plane?",
]
IDEAS = [
    "a rainy weekend", "a science fair project", "a small garden", "a family reunion",
    "healthy school lunches", "a first date", "a book club discussion", "a blog about cooking",
    "a birthday gift for my dad", "a low-budget vacation", "a company newsletter",
    "a child's birthday party", "reducing waste at the office", "a short story",
    "a YouTube channel about history", "a Sunday brunch", "learning something new this year",
]
WRITE = [
    "a short poem about the mountains", "a short story about a lost dog finding its way home",
    "an email asking a landlord to fix the heating", "a product description for a backpack",
    "a short speech for a retirement party", "a friendly reminder about a team meeting",
    "a two-sentence horror story", "a short poem about coffee", "a limerick about a programmer",
    "a motivational message for a friend starting university", "a short review of a pizza place",
    "a packing list for a beach holiday", "a polite complaint about a late delivery",
    "a short fable with a moral", "a welcome message for new club members",
    "a job posting for a junior web developer", "a haiku about the city at night",
]
DESCRIBE = [
    "how a car engine works", "how the heart pumps blood", "how a bill is paid with a credit card",
    "how plants grow from seeds", "how a search engine finds web pages", "how recycling works",
    "how an elevator works", "how the stock market works", "how a microwave heats food",
    "how clouds form", "how a solar panel makes electricity", "how email gets delivered",
    "how a camera takes a picture", "how bees communicate", "how a vaccine is developed",
    "how GPS knows where you are", "how a 3D printer works", "how tides work",
]
COMPARE2 = [
    ("baking soda", "baking powder"), ("a hurricane", "a tornado"), ("a frog", "a toad"),
    ("renting", "buying a house"), ("an LED", "an incandescent bulb"), ("a debit card", "a credit card"),
    ("an ocean", "a sea"), ("a simile", "a metaphor"), ("a rabbit", "a hare"), ("jam", "jelly"),
    ("a moth", "a butterfly"), ("an email", "a letter"), ("a lake", "a pond"),
    ("a laptop", "a tablet"), ("espresso", "drip coffee"), ("a mountain", "a hill"),
]
WHAT_IS = [
    "a credit score", "a mortgage", "an index fund", "inflation", "a carbon footprint",
    "a calorie", "a vitamin", "the immune system", "an allergy", "jet lag", "a habit",
    "a podcast", "an electric car", "a hybrid car", "a heat pump", "composting", "a VPN",
    "a cookie on a website", "cloud storage", "a smart home", "a passport", "a visa",
    "a time zone", "a leap year", "a solar eclipse", "a comet", "an earthquake", "a volcano",
    "a glacier", "a rainforest", "a desert", "a coral reef", "an ecosystem", "a food chain",
    "a democracy", "a constitution", "a tax return", "a budget deficit", "a startup",
    "a resume gap", "a growth mindset", "procrastination", "burnout", "a power nap",
    "intermittent fasting", "a marathon", "yoga", "a sourdough starter", "umami", "fermentation",
]
RECOMMEND = [
    "a few easy houseplants for a dark room", "some podcasts for learning history",
    "a few classic movies for a family night", "some snacks for a long car ride",
    "a simple workout for busy mornings", "some hobbies I can do at home",
    "a few games to play with friends without any equipment", "some ways to relax after work",
    "a few easy dinners for a weeknight", "some gift ideas for a coworker",
    "a good routine for learning to code", "some ways to make a small kitchen feel bigger",
    "a few questions to ask a new doctor", "some ways to stay motivated when learning",
    "a few tips for sleeping on a plane", "some apps for managing money",
]
MORE_HOW_TO = [
    "write a grocery list that saves money", "make a weekly schedule", "prepare for a hurricane",
    "choose a good book to read", "cook pasta al dente", "make iced tea", "sew a button",
    "change a light bulb safely", "clean windows without streaks", "keep my phone battery healthy",
    "write a good headline", "apologize sincerely", "ask for a raise", "handle a difficult customer",
    "give constructive feedback", "say no without feeling guilty", "make a decision when I am stuck",
    "deal with jet lag", "get better at chess", "learn touch typing", "make a good first impression",
    "teach my dog to walk on a leash", "cook lentils", "roast vegetables", "make hummus",
    "grow tomatoes on a balcony", "plan a picnic", "choose a laptop for students",
    "keep a conversation going", "write a condolence message",
]
HELD_OUT_TOPICS = ("tidy", "gears", "bread", "alligator", "crocodile", "new job", "rainbow",
                   "guitar", "ipv4")  # heldout_chat_prompts.jsonl: measured, never trained on


def build(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for t in PY_TASKS:
        out.append(rng.choice(PY_FORMS).format(t=t))
    for lang, t in OTHER_LANG:
        out.append(f"Write a {lang} function that {t}." if lang not in ("SQL", "Bash")
                   else f"Write a {lang} {'query' if lang == 'SQL' else 'command'} that {t}.")
    for c in CONCEPTS:  # two different phrasings per concept
        for form in rng.sample(CONCEPT_FORMS, 2):
            out.append(form.format(c=c))
    out.extend(CHAT)
    out.extend(PY_QUESTIONS)
    for a, b in COMPARE:
        out.append(f"What is the difference between {a} and {b}?")
    out += [f"How do I {t}?" for t in HOW_TO]
    out += [f"What are some tips for {t}?" for t in TIPS]
    out += WHY
    out += [f"Give me a few ideas for {t}." for t in IDEAS]
    out += [f"Write {t}." for t in WRITE]
    out += [f"Explain {t}." for t in DESCRIBE]
    out += [f"What is the difference between {a} and {b}?" for a, b in COMPARE2]
    out += [f"What is {t}?" for t in WHAT_IS]
    out += [f"Can you recommend {t}?" for t in RECOMMEND]
    out += [f"How do I {t}?" for t in MORE_HOW_TO]
    held_out = re.compile(r"\b(" + "|".join(HELD_OUT_TOPICS) + r")\b", re.IGNORECASE)
    out = [p for p in out if not held_out.search(p)]
    seen: set[str] = set()
    uniq = [p for p in out if not (p in seen or seen.add(p))]
    rng.shuffle(uniq)  # any prefix is a mix of kinds (generation may stop early)
    return uniq


if __name__ == "__main__":
    prompts = build()
    path = Path(__file__).with_name("train_prompts.jsonl")
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"{len(prompts)} prompts -> {path}")
