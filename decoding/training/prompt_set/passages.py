"""Copy-heavy prompts over a passage the prompt itself gives: template-built news items,
products, meetings, e-mails, species, recipes, notices, reviews and itineraries (fictional,
so every fact asked about is in the prompt), to summarize, translate, extract or answer.

Part of the #24 prompt set (build.py assembles it; its docstring says why).
"""

from __future__ import annotations

import random
import re

from .slots import DAYS, FIRST, LANGS, MONTHS, PRE, date, person, town


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
