"""Random fictional slots every prompt kind draws from: people, towns, dates, languages.

Part of the #24 prompt set (build.py assembles it; its docstring says why).
"""

from __future__ import annotations

import random


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
