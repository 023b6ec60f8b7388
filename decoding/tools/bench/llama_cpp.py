"""llama.cpp on the same GGUF file in the same run (`bench --llama-bench PATH`): its own
`llama-bench` binary timing plain decode (`-p 0 -n N`: no prompt, N generated tokens),
so the ratio us / llama.cpp is measured on this machine, at this moment, with the same
thread count. llama.cpp is not a dependency: `scripts/install_llama_cpp.sh` builds it
into a separate folder (not in the default install or CI)."""

from __future__ import annotations

import json
import subprocess


def run_llama_bench(binary: str, gguf: str, tokens: int, threads: int,
                    timeout_s: float = 600.0) -> dict | str:
    """{'decode_tokens_per_s', 'stddev', 'ms_per_token', 'threads', 'build', 'cpu'} of
    `llama-bench -p 0 -n tokens -t threads -o json`, or why it could not run (a string:
    the bench goes on without the row)."""
    cmd = [binary, "-m", gguf, "-p", "0", "-n", str(tokens), "-t", str(threads), "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
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
