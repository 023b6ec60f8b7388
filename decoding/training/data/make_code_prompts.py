"""Writes train_code_prompts.jsonl: "Complete this Python function" prompts whose function
stubs (signature + docstring, body removed) come from the Python standard library.

Why: the shipped heads' training answers were mostly prose and short "write a function
that ..." code; a coding assistant is also asked to complete a given stub, and its answers
then repeat the signature and docstring before the body. This file gives the heads that
kind of answer to learn from without touching an evaluation set (HumanEval, MT-bench,
Spec-Bench are not read). The stubs are the standard library's own functions, so the
set depends on the Python version: the committed file was written by Python 3.11.
Deterministic for a given Python: `python decoding/training/data/make_code_prompts.py`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import textwrap
from pathlib import Path

# Pure-Python standard-library modules with many small documented functions.
MODULES = [
    "base64", "bisect", "calendar", "colorsys", "csv", "difflib", "filecmp", "fnmatch",
    "fractions", "ftplib", "genericpath", "getopt", "glob", "gzip", "heapq", "html",
    "imghdr", "inspect", "ipaddress", "json.decoder", "json.encoder", "keyword", "linecache",
    "locale", "mimetypes", "ntpath", "numbers", "operator", "optparse", "os", "pathlib",
    "pickle", "platform", "posixpath", "pprint", "queue", "quopri", "random", "re._parser",
    "reprlib", "sched", "secrets", "shlex", "shutil", "smtplib", "statistics", "string",
    "tarfile", "tempfile", "textwrap", "threading", "tokenize", "traceback", "types",
    "typing", "urllib.parse", "uuid", "warnings", "wave", "weakref", "zipfile",
    "email.utils", "email.quoprimime", "http.cookies", "logging", "argparse", "datetime",
    "decimal", "functools", "collections", "contextlib", "copy", "dataclasses", "enum",
    "graphlib", "hashlib", "hmac", "io", "ast", "dis", "code", "codecs", "configparser",
]
TEMPLATE = "Complete this Python function:\n```python\n{stub}\n```"
NUM_PROMPTS = 360
SEED = 0


def stubs_of(module: str) -> list[str]:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []
    source = Path(spec.origin).read_text(encoding="utf-8")
    tree, lines = ast.parse(source), source.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node, clean=True)
        n_args = len(node.args.args) + len(node.args.kwonlyargs)
        if not doc or not 60 <= len(doc) <= 700 or n_args > 5 or "deprecated" in doc.lower():
            continue
        body_lines = node.end_lineno - node.lineno
        if body_lines < 4 or body_lines > 40:  # something to complete, not a page of code
            continue
        # The source's own lines from `def` to the docstring's end: formatting as written.
        first = node.lineno if not node.decorator_list else node.decorator_list[0].lineno
        out.append(textwrap.dedent("\n".join(lines[first - 1:node.body[0].end_lineno])))
    return out


def main() -> None:
    stubs = sorted({s for m in MODULES for s in stubs_of(m)})
    random.Random(SEED).shuffle(stubs)
    path = Path(__file__).with_name("train_code_prompts.jsonl")
    with path.open("w", encoding="utf-8") as fh:
        for stub in stubs[:NUM_PROMPTS]:
            fh.write(json.dumps({"prompt": TEMPLATE.format(stub=stub)}) + "\n")
    print(f"{path}: {min(len(stubs), NUM_PROMPTS)} prompts of {len(stubs)} stubs")


if __name__ == "__main__":
    main()
