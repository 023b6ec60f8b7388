"""mtpserve-loadtest: load-test any OpenAI-compatible server (mtpserve, vLLM,
llama.cpp server, TGI) and write results.json, summary.md and plots to --out."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import Arm, BenchmarkConfig, LoadLevel, RequestConfig


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError("request rates must be > 0 (inf allowed)")
    return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, dict) and not d):
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtpserve-loadtest", description=__doc__, formatter_class=_HelpFormatter)
    t = p.add_argument_group("target")
    t.add_argument("--base-url", required=True,
                   help="server URL, with or without /v1 (arm A in A/B mode)")
    t.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer'")
    t.add_argument("--model", default=None, help="default: first id of GET /v1/models")
    t.add_argument("--metrics-url", default=None, help="default: <server>/metrics")
    t.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")
    t.add_argument("--trust-env", action="store_true",
                   help="let httpx use proxy settings from the environment")
    r = p.add_argument_group("requests")
    r.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions")
    r.add_argument("--max-tokens", type=int, default=256,
                   help="per request, unless the prompt sets its own (synthetic, JSONL)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--seed", type=int, default=0,
                   help="prompt order, arrivals and bootstrap; also sent as the request seed")
    r.add_argument("--no-request-seed", action="store_true",
                   help="do not send 'seed' in request bodies")
    r.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    r.add_argument("--extra-body", type=_json_object, default={},
                   help="JSON object merged into every request body (null removes a field)")
    r.add_argument("--timeout", type=float, default=120.0, help="per-request limit, seconds")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", default="humaneval",
                   help="humaneval | jsonl:PATH | synthetic:IN,OUT")
    w.add_argument("--num-prompts", type=int, default=None,
                   help="keep the first N after the seeded shuffle (default: all)")
    w.add_argument("--warmup", type=int, default=2,
                   help="requests per arm before the first level, excluded from results")
    ld = p.add_argument_group("load (each level bounded by --num-requests and --duration)")
    ld.add_argument("--concurrency", type=_int_list, default=None,
                    help="closed-loop levels, e.g. 1,2,4,8 (default 1 unless --request-rate)")
    ld.add_argument("--request-rate", type=_rate_list, default=None,
                    help="open-loop Poisson levels in requests/s, e.g. 2,4 (inf = all at once)")
    ld.add_argument("--num-requests", type=int, default=None,
                    help="requests per level (per arm in A/B); default: number of prompts")
    ld.add_argument("--min-rounds", type=int, default=1,
                    help="closed loop: at least this many requests per worker, i.e. a level "
                         "sends max(--num-requests, R x concurrency) (per arm in A/B)")
    ld.add_argument("--duration", type=float, default=600.0,
                    help="seconds per level at most; requests still running are cancelled")
    s = p.add_argument_group("statistics")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT limit")
    s.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ab = p.add_argument_group("A/B (arm A = baseline, arm B = candidate)")
    ab.add_argument("--ab", action="store_true", help="compare arm A with arm B")
    ab.add_argument("--base-url-b", default=None, help="arm B server (default: --base-url)")
    ab.add_argument("--api-key-b", default=None, help="default: --api-key")
    ab.add_argument("--model-b", default=None, help="default: --model, else from /v1/models")
    ab.add_argument("--metrics-url-b", default=None, help="default: <server B>/metrics")
    ab.add_argument("--extra-body-a", type=_json_object, default=None,
                    help='e.g. \'{"speculation": {"enabled": false}}\'')
    ab.add_argument("--extra-body-b", type=_json_object, default=None,
                    help='e.g. \'{"speculation": {"enabled": true}}\'')
    ab.add_argument("--ab-schedule", choices=("interleaved", "separate", "alternating"),
                    default="interleaved",
                    help="interleaved: each prompt to both arms in one closed loop (the arms "
                         "share the load); separate: each level runs once per arm, alone, "
                         "order alternating by level (use it for two servers on one machine, "
                         "or to compare all-on with all-off on one server); alternating: "
                         "like separate, but each level in --ab-blocks chunks that both arms "
                         "run back to back (ABBA...), so machine drift falls on both arms")
    ab.add_argument("--ab-blocks", type=int, default=4, metavar="R",
                    help="alternating schedule: chunks per level (default 4; fewer where a "
                         "chunk would hold fewer requests than the level's concurrency, "
                         "which it would then not reach)")
    ab.add_argument("--logprobs-in-run", type=int, default=None, metavar="K",
                    help="ask every request of both arms for top-K logprobs, so temperature-0 "
                         "mismatches are judged in the run that produced them (default: 2 "
                         "for A/B at temperature 0, else off; 0 = off: re-ask arm A instead)")
    ab.add_argument("--near-tie-margin", type=float, default=0.5,
                    help="top-2 logprob margin below which a temperature-0 mismatch is a near tie")
    ab.add_argument("--max-probes", type=int, default=10,
                    help="mismatches per level re-asked with logprobs")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path("loadtest-results"), help="output folder")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchmarkConfig:
    b_given = (args.base_url_b is not None or args.extra_body_a is not None
               or args.extra_body_b is not None)
    if args.ab and not b_given:
        parser.error("--ab needs --base-url-b or --extra-body-a/--extra-body-b")
    if b_given and not args.ab:
        parser.error("--base-url-b / --extra-body-a / --extra-body-b need --ab")
    if args.num_requests is not None and args.num_requests < 1:
        parser.error("--num-requests must be >= 1")
    if args.ab_blocks < 1:
        parser.error("--ab-blocks must be >= 1")
    if args.min_rounds < 1:
        parser.error("--min-rounds must be >= 1")
    try:
        if args.ab:
            arms = (Arm("A", args.base_url, args.model, args.api_key, args.extra_body_a or {},
                        args.metrics_url),
                    Arm("B", args.base_url_b or args.base_url, args.model_b or args.model,
                        args.api_key_b or args.api_key, args.extra_body_b or {},
                        args.metrics_url_b or (None if args.base_url_b else args.metrics_url)))
        else:
            arms = (Arm("main", args.base_url, args.model, args.api_key, {}, args.metrics_url),)
        in_run = args.logprobs_in_run
        if in_run is None:
            in_run = 2 if args.ab and args.temperature == 0 else 0
        request = RequestConfig(
            top_logprobs=in_run or None, endpoint=args.endpoint, max_tokens=args.max_tokens, temperature=args.temperature,
            seed=None if args.no_request_seed else args.seed, ignore_eos=args.ignore_eos,
            timeout_s=args.timeout, extra_body=args.extra_body)
        num_requests = args.num_requests or _default_num_requests(args)
        levels = [LoadLevel("closed", c, max(num_requests, args.min_rounds * c), args.duration)
                  for c in (args.concurrency or ([] if args.request_rate else [1]))]
        levels += [LoadLevel("open", rate, num_requests, args.duration)
                   for rate in (args.request_rate or [])]
        return BenchmarkConfig(
            arms=arms, request=request, levels=tuple(levels), workload=args.workload,
            num_prompts=args.num_prompts, seed=args.seed, warmup=args.warmup,
            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
            scrape_metrics=not args.no_metrics, bootstrap_resamples=args.bootstrap,
            near_tie_margin=args.near_tie_margin, max_mismatch_probes=args.max_probes,
            trust_env=args.trust_env, ab_schedule=args.ab_schedule, ab_blocks=args.ab_blocks)
    except ValueError as e:
        parser.error(str(e))


def _default_num_requests(args: argparse.Namespace) -> int:
    from .workloads import load_workload
    try:
        return len(load_workload(args.workload, num_prompts=args.num_prompts, seed=args.seed))
    except ValueError:
        return args.num_prompts or 100  # the real load reports the error


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    from .benchmark import run_benchmark
    from .plots import matplotlib_missing, write_plots
    from .report import markdown_summary, write_json, write_markdown

    try:
        result = asyncio.run(run_benchmark(cfg, progress=not args.no_progress))
    except ValueError as e:
        print(f"mtpserve-loadtest: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtpserve-loadtest: interrupted", file=sys.stderr)
        return 130
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(result, out), write_markdown(result, out)]
    if not args.no_plots:
        missing = matplotlib_missing()
        if missing:
            print(f"mtpserve-loadtest: {missing}", file=sys.stderr)
        else:
            written += write_plots(result, out)
    print(markdown_summary(result))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    ok = sum(a.num_ok for lv in result.levels for a in lv.arms.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
