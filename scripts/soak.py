#!/usr/bin/env python3
"""Soak test: mtpserve-loadtest at saturation against a running mtpserve for N minutes.

    .venv/bin/python scripts/soak.py --minutes 10                # starts its own server
    .venv/bin/python scripts/soak.py --base-url http://127.0.0.1:8000 --pid PID --minutes 10

Steps:
1. baseline: every prompt once, alone (mtpserve-loadtest at concurrency 1): the greedy
   answer expected for it;
2. soak: mtpserve-loadtest in open loop (Poisson) at `--rate` requests/s for the duration;
   by default `overload x max_num_seqs / (mean latency of one request alone)`, above what
   the engine can serve even with perfect batching, so its slots and the admission queue
   stay full and the excess gets the documented 429 (bounded by the rate, unlike a closed
   loop that would retry 429s in a hot loop);
3. checks: every answered request carries its own prompt's answer: equal to the
   baseline (greedy, temperature 0), or leaving it only where the prompt has a near tie
   (top-2 logprob margin under --near-tie-margin, probed with logprobs: fp32 kernels of
   other batch shapes round differently, which flips near ties), never another prompt's
   answer or one wrong from the first character (a mix-up); no error but http_429
   (requests still running when the duration ends are cancelled by the client, counted
   apart); the server's own counters agree (200s and 429s between what the client saw
   and that plus the cancelled ones; every request counted once); the engine is idle
   afterwards (no running or waiting request, KV cache empty); the server's RSS and open
   file descriptors at start, peak and end (end within 64 MiB and 4 fds of the start);
   latency percentiles per minute.

Writes OUT/report.json and OUT/report.md (plus the load tester's own results) and exits
1 when a check fails. The server it starts uses fp32 (`--dtype float32`), where the
engine's logits move with the batch's shape by a few hundredths of a nat at most, so
only near ties flip; in bf16 they move more. tests/server/test_soak.py runs a 25-second
version of `run_soak` in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Name three prime numbers.",
    "What is the capital of France?",
    "Write a haiku about caching.",
    "List the numbers from 1 to 12, comma separated.",
    "Explain what a hash table is in one sentence.",
    "Say hello three times.",
    "Write a Python function that adds two numbers.",
    "What color is the sky on a clear day?",
    "Give two synonyms for 'quick'.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
    "Describe a cat in five words.",
    "Write one sentence about the ocean.",
    "What does CPU stand for?",
    "Name a planet larger than Earth.",
    "Suggest a name for a pet goldfish.",
    "What is the opposite of 'ancient'?",
    "Write a short rhyme about rain.",
    "How many days are in a leap year?",
    "Give an example of a mammal that can fly.",
    "Summarize the plot of Cinderella in one sentence.",
    "What is the boiling point of water in Celsius?",
    "Write the alphabet backwards from Z to T.",
    "Why do leaves change color in autumn?",
]


# ---------------------------------------------------------------------------------------
# process sampling


def proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process on this machine."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
                break
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


class Sampler(threading.Thread):
    """RSS and fds of `pid` every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            try:
                rss, fds = proc_sample(self.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            self.samples.append((time.monotonic() - t0, rss, fds))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---------------------------------------------------------------------------------------
# server side


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def requests_by_status(m: dict, endpoint: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, labels), v in m.items():
        d = dict(labels)
        if name == "mtpserve_requests_total" and d.get("endpoint") == endpoint:
            out[d["status"]] = out.get(d["status"], 0.0) + v
    return out


def wait_idle(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        if m[("mtpserve_num_requests_running", ())] == 0 and \
                m[("mtpserve_num_requests_waiting", ())] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def start_server(args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mtpserve.server.cli", "serve", "--port", str(port),
           "--dtype", "float32", "--max-num-seqs", str(args.max_num_seqs),
           "--max-queued", str(args.max_queued), "--max-model-len", "1024",
           "--drain-timeout", "30"]
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {out}/server.log")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not become healthy in 300 s")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------
# load


def loadtest(base_url: str, out: Path, prompts: Path, max_tokens: int, extra: list[str],
             timeout: float) -> list[dict[str, Any]]:
    """Run the mtpserve-loadtest command line; its per-request records."""
    cmd = [sys.executable, "-m", "mtpserve.loadtest.cli", "--base-url", base_url,
           "--endpoint", "chat", "--workload", f"jsonl:{prompts}", "--max-tokens",
           str(max_tokens), "--temperature", "0", "--warmup", "0", "--no-plots",
           "--no-progress", "--bootstrap", "100", "--timeout", str(timeout),
           "--out", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"mtpserve-loadtest failed ({done.returncode}): "
                           f"{done.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())["requests"]


def first_diff(a: str, b: str) -> int:
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def classify(base_url: str, messages: dict[str, list], expected: dict[str, tuple],
             got: list[dict], max_tokens: int, near_tie_margin: float) -> list[dict]:
    """Why each distinct wrong answer differs from its prompt's baseline.

    "mixup": it is another prompt's answer, or differs from the first character: a
    request got someone else's output. "near_tie": it leaves the baseline later, where
    the prompt alone (asked again with logprobs) has a top-2 logprob margin below
    `near_tie_margin`: the engine's numbers moved with the batch and flipped a near tie
    (fp32 kernels of other shapes round differently). "unexplained": anything else.
    """
    others = {text: pid for pid, (text, _) in expected.items()}
    out = []
    for pid, text in sorted({(r["prompt_id"], r["text"]) for r in got}):
        want = expected[pid][0]
        at = first_diff(text, want)
        row = {"prompt_id": pid, "diverges_at_char": at, "margin": None,
               "got": text[:200], "expected": want[:200]}
        if others.get(text, pid) != pid or at == 0:
            out.append({**row, "kind": "mixup"})
            continue
        probe = httpx.post(base_url + "/v1/chat/completions", timeout=300, json={
            "messages": messages[pid], "max_tokens": max_tokens, "temperature": 0,
            "logprobs": True, "top_logprobs": 2,
            "speculation": {"enabled": False}}).json()["choices"][0]  # the plain path
        # the token covering the first character where the wrong answer, or the probe
        # itself, leaves the baseline
        at = min(at, first_diff(probe["message"]["content"] or "", want))
        pos = 0
        for tok in probe["logprobs"]["content"]:
            if pos + len(tok["token"]) > at:
                tops = tok["top_logprobs"]
                if len(tops) > 1:
                    row["margin"] = tops[0]["logprob"] - tops[1]["logprob"]
                break
            pos += len(tok["token"])
        near = row["margin"] is not None and row["margin"] < near_tie_margin
        out.append({**row, "kind": "near_tie" if near else "unexplained"})
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def per_window(records: list[dict], minute_s: float,
               samples: list[tuple[float, float, int]]) -> list[dict[str, Any]]:
    """Per window of `minute_s`: requests started in it, latency percentiles of the
    answered ones, and the server's largest RSS / fds sampled in it."""
    rows: dict[int, dict[str, Any]] = {}
    for r in records:
        if r["error_type"] == "cancelled":
            continue
        m = int(r["start_s"] // minute_s)
        row = rows.setdefault(m, {"from_s": m * minute_s, "ok": 0, "http_429": 0,
                                  "other": 0, "e2e": [], "ttft": []})
        if r["ok"]:
            row["ok"] += 1
            row["e2e"].append(r["e2e_s"])
            row["ttft"].append(r["ttft_s"])
        elif r["error_type"] == "http_429":
            row["http_429"] += 1
        elif r["error_type"] != "cancelled":
            row["other"] += 1
    out = []
    for m in sorted(rows):
        row = rows[m]
        e2e, ttft = row.pop("e2e"), row.pop("ttft")
        for q in (50, 90, 99):
            row[f"e2e_p{q}_s"] = pct(e2e, q)
            row[f"ttft_p{q}_s"] = pct(ttft, q)
        inside = [(rss, fds) for t, rss, fds in samples if m * minute_s <= t < (m + 1) * minute_s]
        row["rss_mib"] = max((x[0] for x in inside), default=None)
        row["fds"] = max((x[1] for x in inside), default=None)
        out.append(row)
    return out


def run_soak(base_url: str, pid: int, out: Path, *, duration_s: float, num_prompts: int,
             max_tokens: int, max_num_seqs: int, rate: float | None = None,
             overload: float = 1.5, timeout: float = 300.0, minute_s: float = 60.0,
             rss_slack_mib: float = 64.0, fd_slack: int = 4,
             near_tie_margin: float = 0.25) -> dict[str, Any]:
    """Baseline, soak, checks. Returns the report (report["passed"] says it all)."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(num_prompts):
            text = PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")
            f.write(json.dumps({"id": f"p{i:03d}", "messages": [
                {"role": "user", "content": text}]}) + "\n")

    # 1. baseline: each prompt alone
    base = loadtest(base_url, out / "baseline", prompts, max_tokens,
                    ["--concurrency", "1", "--num-requests", str(num_prompts)], timeout)
    bad = [r for r in base if not r["ok"]]
    if bad:
        raise RuntimeError(f"baseline requests failed: {bad[:3]}")
    expected = {r["prompt_id"]: (r["text"], r["finish_reason"]) for r in base}
    latency_1 = statistics.mean(r["e2e_s"] for r in base)
    if rate is None:
        rate = overload * max_num_seqs / latency_1

    # 2. soak
    wait_idle(base_url, 60)
    rss0, fd0 = proc_sample(pid)
    m0 = scrape(base_url)
    sampler = Sampler(pid)
    sampler.start()
    t0 = time.monotonic()
    num_requests = int(rate * duration_s * 1.2) + num_prompts
    recs = loadtest(base_url, out / "soak", prompts, max_tokens,
                    ["--request-rate", f"{rate:.4f}", "--num-requests", str(num_requests),
                     "--duration", str(duration_s)], timeout)
    load_s = time.monotonic() - t0
    m1 = wait_idle(base_url, 120)
    time.sleep(1.0)  # connections of the finished load tester close
    rss1, fd1 = proc_sample(pid)
    sampler.stop()
    samples = sampler.samples + [(time.monotonic() - t0, rss1, fd1)]

    # 3. checks
    ok = [r for r in recs if r["ok"]]
    n429 = sum(r["error_type"] == "http_429" for r in recs)
    cancelled = sum(r["error_type"] == "cancelled" for r in recs)
    other = [r for r in recs if not r["ok"] and r["error_type"] not in ("http_429", "cancelled")]
    wrong = [r for r in ok if (r["text"], r["finish_reason"]) != expected[r["prompt_id"]]]
    messages = {json.loads(line)["id"]: json.loads(line)["messages"]
                for line in prompts.read_text().splitlines()}
    kinds = classify(base_url, messages, expected, wrong, max_tokens, near_tie_margin)
    kind_of = {(k["prompt_id"], k["got"]): k["kind"] for k in kinds}
    count = {kind: sum(kind_of[(r["prompt_id"], r["text"][:200])] == kind for r in wrong)
             for kind in ("mixup", "near_tie", "unexplained")}
    before, after = (requests_by_status(m, "/v1/chat/completions") for m in (m0, m1))
    d = {s: after.get(s, 0) - before.get(s, 0) for s in set(before) | set(after)}
    d = {s: int(v) for s, v in d.items() if v}
    peak_rss = max(s[1] for s in samples)
    peak_fd = max(s[2] for s in samples)
    idle = {"running": m1[("mtpserve_num_requests_running", ())],
            "waiting": m1[("mtpserve_num_requests_waiting", ())],
            "kv_cache_usage": m1[("mtpserve_kv_cache_usage_ratio", ())]}
    checks = {
        "no_answer_mixed_up": count["mixup"] == 0,
        "every_other_difference_a_near_tie": count["unexplained"] == 0,
        "only_429_errors": not other,
        "saturated": n429 > 0,
        # a request the client cancelled at the end may have been answered just before
        "server_429_count_agrees": n429 <= d.get("429", 0) <= n429 + cancelled,
        "server_200_count_agrees": len(ok) <= d.get("200", 0) <= len(ok) + cancelled,
        "server_counted_each_request_once":
            len(ok) + n429 <= sum(d.values()) <= len(ok) + n429 + cancelled,
        "engine_idle_after": idle == {"running": 0, "waiting": 0, "kv_cache_usage": 0},
        "rss_flat": rss1 - rss0 <= rss_slack_mib,
        "fds_flat": fd1 - fd0 <= fd_slack,
    }
    report = {
        "passed": all(checks.values()),
        "checks": checks,
        "config": {"base_url": base_url, "duration_s": duration_s, "rate_per_s": rate,
                   "max_tokens": max_tokens, "prompts": num_prompts,
                   "max_num_seqs": max_num_seqs, "baseline_mean_latency_s": latency_1,
                   "near_tie_margin": near_tie_margin, "window_s": minute_s,
                   "largest_margin": max((k["margin"] for k in kinds
                                          if k["kind"] == "near_tie"), default=None)},
        "load_wall_s": load_s,
        "requests": {"sent": len(recs), "ok": len(ok), "http_429": n429,
                     "cancelled_at_end": cancelled, "other_errors": len(other),
                     "identical_to_baseline": len(ok) - len(wrong),
                     "near_tie_flips": count["near_tie"], "mixed_up": count["mixup"],
                     "unexplained": count["unexplained"]},
        "server_status_counts": d,
        "engine_after": idle,
        "rss_mib": {"start": rss0, "peak": peak_rss, "end": rss1},
        "fds": {"start": fd0, "peak": peak_fd, "end": fd1},
        "per_window": per_window(recs, minute_s, samples),
        "differences": kinds[:50],
        "other_errors": [{k: r[k] for k in ("prompt_id", "error_type", "error_detail",
                                            "status_code")} for r in other[:20]],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(r: dict[str, Any]) -> str:
    c, q = r["config"], r["requests"]
    lines = [
        f"# soak: {'PASS' if r['passed'] else 'FAIL'}", "",
        f"{c['duration_s']:.0f} s at {c['rate_per_s']:.2f} requests/s (Poisson), "
        f"{c['prompts']} chat prompts, max_tokens {c['max_tokens']}, temperature 0; "
        f"one request alone took {c['baseline_mean_latency_s']:.2f} s on average.", "",
        f"requests: {q['sent']} sent, {q['ok']} answered, {q['http_429']} refused with 429, "
        f"{q['cancelled_at_end']} cancelled at the end, {q['other_errors']} other errors.", "",
        f"answers: {q['identical_to_baseline']} identical to their prompt's answer alone, "
        f"{q['near_tie_flips']} flipped at a near tie (top-2 margin "
        f"< {c['near_tie_margin']} nats; largest {_f(c['largest_margin'], 3)}), "
        f"{q['mixed_up']} mixed up, {q['unexplained']} unexplained.", "",
        f"server counted: {r['server_status_counts']}; engine afterwards: "
        f"{r['engine_after']}", "",
        "| | start | peak | end |", "|---|---|---|---|",
        f"| RSS (MiB) | {r['rss_mib']['start']:.0f} | {r['rss_mib']['peak']:.0f} | "
        f"{r['rss_mib']['end']:.0f} |",
        f"| open fds | {r['fds']['start']} | {r['fds']['peak']} | {r['fds']['end']} |", "",
        f"Requests started in each {c['window_s']:.0f} s window, their latency (s), and the "
        "server's largest RSS and fd count sampled in it:", "",
        "| from s | ok | 429 | other | e2e p50 | e2e p90 | e2e p99 | TTFT p50 | TTFT p90 "
        "| TTFT p99 | RSS MiB | fds |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in r["per_window"]:
        lines.append(f"| {m['from_s']:.0f} | {m['ok']} | {m['http_429']} | {m['other']} | "
                     + " | ".join(_f(m[f"{k}_p{p}_s"]) for k in ("e2e", "ttft")
                                  for p in (50, 90, 99))
                     + f" | {_f(m['rss_mib'], 0)} | {m['fds'] if m['fds'] is not None else '-'} |")
    lines += ["", "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}"
                                         for k, v in r["checks"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=None,
                    help="a running server (default: start one, fp32, and stop it after)")
    ap.add_argument("--pid", type=int, default=None,
                    help="the server's process id, for RSS and fds (required with --base-url)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=8,
                    help="the server's --max-num-seqs (sets the default rate)")
    ap.add_argument("--max-queued", type=int, default=8,
                    help="--max-queued of the server this script starts")
    ap.add_argument("--rate", type=float, default=None, help="requests/s (default: see above)")
    ap.add_argument("--overload", type=float, default=1.5)
    ap.add_argument("--near-tie-margin", type=float, default=0.25,
                    help="top-2 logprob margin (nats) below which a differing answer is a "
                         "near-tie flip rather than a failure (default 0.25)")
    ap.add_argument("--out", type=Path, default=Path("soak-results"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    proc = None
    if args.base_url is None:
        proc, url = start_server(args, args.out)
        pid = proc.pid
    else:
        if args.pid is None:
            ap.error("--pid is needed with --base-url")
        url, pid = args.base_url.rstrip("/"), args.pid
    try:
        report = run_soak(url, pid, args.out, duration_s=args.minutes * 60,
                          num_prompts=args.prompts, max_tokens=args.max_tokens,
                          max_num_seqs=args.max_num_seqs, rate=args.rate,
                          overload=args.overload, near_tie_margin=args.near_tie_margin)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
                print(f"server exited with {code} after SIGTERM", file=sys.stderr)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(markdown(report))
    print(f"wrote {args.out}/report.json, {args.out}/report.md", file=sys.stderr)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
