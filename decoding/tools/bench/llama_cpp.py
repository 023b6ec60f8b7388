"""llama.cpp on the same GGUF file in the same run (`bench --llama-bench PATH`): its own
`llama-bench` binary timing plain decode (`-p 0 -n N`: no prompt, N generated tokens),
so the ratio us / llama.cpp is measured on this machine, at this moment, with the same
thread count. `bench --llama-lookup PATH` runs llama.cpp's own n-gram (prompt lookup)
speculation, its `llama-lookup` example, on the bench's prompts, with and without drafts.
llama.cpp is not a dependency: `scripts/install_llama_cpp.sh` builds it into a separate
folder (not in the default install or CI)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from typing import TYPE_CHECKING

import torch

from .tables import format_table

if TYPE_CHECKING:
    import argparse

    from ...engine.llm_engine import LLMEngine


def run_llama_bench(binary: str, gguf: str, tokens: int, threads: int,
                    timeout_s: float = 600.0) -> dict | str:
    """{'decode_tokens_per_s', 'stddev', 'ms_per_token', 'threads', 'build', 'cpu'} of
    `llama-bench -p 0 -n tokens -t threads -o json`, or why it could not run (a string:
    the bench goes on without the row)."""
    cmd = [binary, "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads), "-o", "json"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} did not run: {e}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{binary} exited {done.returncode}: {tail[0]}"
    return parse_llama_bench_json(done.stdout)


def parse_llama_bench_json(text: str) -> dict | str:
    """The generation test of llama-bench's JSON list (n_prompt 0, n_gen > 0)."""
    try:
        tests = json.loads(text[text.index("["):])
    except ValueError:
        return "llama-bench printed no JSON list"
    gen = [t for t in tests if t.get("n_prompt") == 0 and t.get("n_gen", 0) > 0]
    if not gen:
        return "llama-bench JSON has no generation test"
    t = gen[0]
    ts = float(t["avg_ts"])
    return {"decode_tokens_per_s": ts, "stddev": float(t.get("stddev_ts", 0.0)),
            "ms_per_token": 1000.0 / ts, "threads": t.get("n_threads"),
            "build": t.get("build_commit"), "cpu": t.get("cpu_info")}


# -- llama.cpp's own n-gram speculation (`bench --llama-lookup PATH`) ----------------------
_LOOKUP_FIELDS = {
    "encoded": re.compile(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "decoded": re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds"),
    "drafted": re.compile(r"n_drafted\s*=\s*(\d+)"),
    "accepted": re.compile(r"n_accept\s*=\s*(\d+)"),
}
_DRAFT_LINE = re.compile(r" - draft candidate: token=\d+\n")


def parse_lookup_log(log: str) -> dict | str:
    """The counts `llama-lookup` prints at the end: prompt tokens and seconds, generated
    tokens and seconds, drafted and accepted drafts; or what is missing (a string)."""
    got: dict = {}
    for name, rx in _LOOKUP_FIELDS.items():
        m = rx.search(log)
        if m is None:
            return f"llama-lookup printed no '{name}' line"
        if name in ("encoded", "decoded"):
            got[f"{name}_tokens"], got[f"{name}_s"] = int(m.group(1)), float(m.group(2))
        else:
            got[name] = int(m.group(1))
    return got


def lookup_text(stdout: str) -> str:
    """The generated text of llama-lookup's stdout, without its draft-candidate lines."""
    return _DRAFT_LINE.sub("", stdout)


def lookup_draft_flag(binary: str) -> str:
    """llama-lookup's option for the tokens drafted per step: `--draft` until llama.cpp
    renamed it (newer builds refuse `--draft` with "the argument has been removed" and take
    `--spec-draft-n-max`); read from its own help."""
    try:
        done = subprocess.run([binary, "-h"], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "--draft"
    return "--spec-draft-n-max" if "--spec-draft-n-max" in done.stdout + done.stderr else "--draft"


def run_llama_lookup(binary: str, gguf: str, prompt: str, tokens: int, threads: int,
                     draft: int, timeout_s: float = 600.0, draft_flag: str = "--draft"
                     ) -> dict | str:
    """Greedy generation of `tokens` tokens after `prompt` (text with the chat template
    already applied) with llama.cpp's prompt-lookup speculation (`--draft` tokens; 0: plain
    decoding through the same program), its counts (parse_lookup_log) plus the text; or
    why it could not run (a string)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as f:
        f.write(prompt)
    cmd = [binary, "-m", gguf, "-f", f.name, "-n", str(tokens), "-t", str(threads),
           "--temp", "0", draft_flag, str(draft), "-c", "4096"]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} did not run: {e}"
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return f"{binary} exited {done.returncode}: {tail[0]}"
    got = parse_lookup_log(done.stderr + done.stdout)
    if isinstance(got, dict):
        got["text"] = lookup_text(done.stdout)
    return got


def lookup_summary(plain: list[dict], spec: list[dict]) -> dict:
    """Both arms over the same prompts: tokens/s (decode only, and with the prompt),
    the speedup, the acceptance rate, and how many outputs differ from plain decoding
    within the shorter one (llama-lookup may overshoot -n by accepted drafts)."""
    def rate(runs: list[dict], with_prompt: bool) -> float:
        s = sum(r["decoded_s"] + (r["encoded_s"] if with_prompt else 0.0) for r in runs)
        return sum(r["decoded_tokens"] for r in runs) / max(s, 1e-9)

    differ = 0
    for a, b in zip(plain, spec):
        n = min(len(a["text"]), len(b["text"]))
        differ += a["text"][:n] != b["text"][:n]
    drafted = sum(r["drafted"] for r in spec)
    return {"plain_decode_tokens_per_s": rate(plain, False),
            "spec_decode_tokens_per_s": rate(spec, False),
            "plain_tokens_per_s_with_prompt": rate(plain, True),
            "spec_tokens_per_s_with_prompt": rate(spec, True),
            "speedup_decode": rate(spec, False) / max(rate(plain, False), 1e-9),
            "acceptance_rate": sum(r["accepted"] for r in spec) / max(drafted, 1),
            "outputs_differ": differ, "prompts": len(spec)}


def lookup_section(engine: LLMEngine, args: argparse.Namespace, prompt_ids: list[list[int]],
                   compare_rows: list[dict] | None = None) -> dict:
    """`bench --llama-lookup PATH`: llama.cpp's n-gram speculation on the bench's prompts
    (their chat text as this engine renders it), plain (0 drafts) and speculative,
    alternating per prompt; with `--compare`, our greedy batch-1 speculation against it."""
    from ...model.checkpoint import default_model_path

    gguf = str(args.model or default_model_path())
    if not gguf.endswith(".gguf"):
        return {"skipped": f"not a GGUF file: {gguf}"}
    threads, draft = torch.get_num_threads(), args.llama_lookup_draft
    flag = lookup_draft_flag(args.llama_lookup)
    plain: list[dict] = []
    spec: list[dict] = []
    for i, ids in enumerate(prompt_ids):
        text = engine.tokenizer.decode(ids, skip_special_tokens=False)
        print(f"llama.cpp: llama-lookup prompt {i + 1}/{len(prompt_ids)}", file=sys.stderr,
              flush=True)
        for arm, n in ((plain, 0), (spec, draft)):
            got = run_llama_lookup(args.llama_lookup, gguf, text, args.max_tokens, threads, n,
                                   draft_flag=flag)
            if isinstance(got, str):
                print(f"llama-lookup skipped: {got}", file=sys.stderr)
                return {"skipped": got}
            arm.append(got)
    out = {"draft": draft, "draft_flag": flag, "threads": threads,
           **lookup_summary(plain, spec)}
    ours = next((r for r in compare_rows or [] if r["setting"] == "greedy" and r["batch"] == 1),
                None)
    if ours is not None:
        out["mtpserve_spec_tokens_per_s"] = ours["on"]["tokens_per_s"]
        out["mtpserve_spec_vs_llama_lookup"] = (ours["on"]["tokens_per_s"]
                                                / out["spec_tokens_per_s_with_prompt"])
    return out


def lookup_table(out: dict) -> str:
    if "skipped" in out:
        return f"\nllama.cpp n-gram speculation: skipped ({out['skipped']})"
    flag = out.get("draft_flag", "--draft")
    rows = [[f"llama-lookup {flag} 0", out["plain_tokens_per_s_with_prompt"],
             out["plain_decode_tokens_per_s"], None, "-"],
            [f"llama-lookup {flag} {out['draft']}", out["spec_tokens_per_s_with_prompt"],
             out["spec_decode_tokens_per_s"], out["acceptance_rate"],
             f"{out['outputs_differ']}/{out['prompts']}"]]
    text = format_table(["llama.cpp", "tok/s", "decode tok/s", "draft acc", "outputs differ"],
                        rows, f"\nllama.cpp's n-gram speculation, same prompts and file, "
                              f"{out['threads']} threads, greedy (tok/s includes the prompt)")
    text += f"\nllama.cpp speculation on vs off (decode): {out['speedup_decode']:.2f}x"
    if "mtpserve_spec_vs_llama_lookup" in out:
        text += (f"\nmtpserve speculation on (greedy, batch 1) vs llama.cpp's: "
                 f"{out['mtpserve_spec_tokens_per_s']:.1f} vs "
                 f"{out['spec_tokens_per_s_with_prompt']:.1f} tok/s = "
                 f"{out['mtpserve_spec_vs_llama_lookup']:.2f}x")
    return text
