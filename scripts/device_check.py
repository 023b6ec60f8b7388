"""The engine on an accelerator, checked against transformers on the same weights there.

The GPU machine lent to some sessions cannot fetch anything and takes at most 64 MiB of
files, so the default GGUF cannot travel. This script runs in two places:

    # here: the default model's config and tokenizer files, no weights (~4 MB)
    .venv/bin/python scripts/device_check.py prepare .device/smollm2
    # there (scripts/device_check.sh sets the import path): random weights of that shape
    # (transformers' own initialisation, seeded), then the checks and the benchmark
    python3 scripts/device_check.py run .device/smollm2 --device cuda

`run` prints, then returns 1 if a check failed: (1) fp32 logits of a packed prefill
against transformers' forward, (2) 64 greedy tokens against transformers' `generate`, and
speculative greedy (n-gram drafts, trees verified in one pass) against plain greedy, both
in fp32 (a difference is reported with the top-2 margin where it happened: random weights
have near-ties), (3) int4 and int8 weights through the device's kernels against the same
format through PyTorch's CPU kernels (greedy tokens, top-20 logprobs); then
`mtpserve bench` in bf16 (batch 1 and 16 vs transformers, the verify curve). Also runs
on CPU (`--device cpu`), which is how it is tested here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "benchmarks" / "prompts" / "chat16.jsonl"
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def prepare(out: Path, num_layers: int | None = None) -> None:
    """`num_layers`: fewer decoder layers than the default model's 30 (the checks are the
    same; CI runs them on CPU at 2 layers, a quarter of the model's parameters)."""
    from mtpserve.decoding.tools.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        export_model(None, Path(tmp) / "m", dtype="bfloat16")
        out.mkdir(parents=True, exist_ok=True)
        for name in CONFIG_FILES:
            shutil.copy(Path(tmp) / "m" / name, out / name)
    if num_layers is not None:
        config = json.loads((out / "config.json").read_text())
        config["num_hidden_layers"] = num_layers
        (out / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {', '.join(CONFIG_FILES)} to {out}")


def random_folder(src: Path, dst: Path, seed: int) -> None:
    """src's config and tokenizer plus transformers-initialised random weights (fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(dst)
    for name in CONFIG_FILES:
        if name != "config.json":
            shutil.copy(src / name, dst / name)


def _engine(folder: Path, device: str, dtype: str, weights: str = "dense", spec: str = "off"):
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(EngineConfig(
        model=str(folder), device=device, dtype=dtype, weights=weights, max_num_seqs=4,
        max_model_len=1024, spec=SpecConfig(mode=spec, proposer="ngram")))


def _run(engine, prompt: list[int], params) -> tuple[list[int], list, int]:
    """(token ids, per-token logprobs, engine steps) of one request run alone."""
    engine.add_request("check", prompt, params)
    ids, logprobs, steps = [], [], 0
    while engine.has_unfinished():
        for out in engine.step():
            ids += out.new_token_ids
            logprobs += out.logprobs or []
            steps += 1
    return ids, logprobs, steps


@torch.inference_mode()
def checks(folder: Path, device: str, max_tokens: int) -> list[tuple[str, bool, str]]:
    from transformers import AutoModelForCausalLM

    from mtpserve.decoding.config import SamplingParams

    results: list[tuple[str, bool, str]] = []
    plain = _engine(folder, device, "float32")
    dev = plain.device
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    prompt = plain.tokenizer.encode_chat(
        [{"role": "user", "content": "Write a Python function that reverses a list."}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=20)
    ours, logprobs, steps = _run(plain, prompt, params)

    # (1) every generated position's top-20 logprobs against transformers' forward over
    # the same tokens (teacher-forced on ours, so one difference cannot cascade)
    ref = hf(torch.tensor([prompt + ours], device=dev)).logits[0, len(prompt) - 1:-1]
    ref = ref.float().log_softmax(-1)
    worst = 0.0
    for pos, lp in enumerate(logprobs):
        got = torch.tensor([v for _, v in lp.top], device=dev)
        want = ref[pos, torch.tensor([t for t, _ in lp.top], device=dev)]
        worst = max(worst, float((got - want).abs().max()))
    results.append((f"top-20 logprobs at {len(logprobs)} positions == transformers (fp32)",
                    worst < 1e-3 and len(logprobs) == max_tokens, f"max |diff| {worst:.1e}"))

    # (2) greedy continuation == transformers generate; speculative == plain
    hf_ids = hf.generate(torch.tensor([prompt], device=dev), max_new_tokens=max_tokens,
                         min_new_tokens=max_tokens, do_sample=False)[0, len(prompt):].tolist()
    results.append(_same(f"greedy {max_tokens} tokens == transformers generate (fp32)",
                         ours, hf_ids, ref))
    spec = _engine(folder, device, "float32", spec="on")
    spec_ids, _, spec_steps = _run(spec, prompt, SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    name = f"speculative greedy == plain greedy (fp32; {steps} plain steps, {spec_steps} speculative)"
    results.append(_same(name, spec_ids, ours, ref))
    del spec

    # (3) int4/int8 through the device's own kernels (each layer self-checked at load)
    # against the same format through PyTorch's CPU kernels, which CI tests everywhere
    for fmt in ("int4", "int8"):
        results.append(_quantized_vs_cpu(folder, device, fmt, prompt, params))
    return results


def _quantized_vs_cpu(folder: Path, device: str, fmt: str, prompt: list[int], params
                      ) -> tuple[str, bool, str]:
    """fmt's greedy tokens and top-20 logprobs on `device` against fmt on CPU. Both feed
    the kernels bf16, so logprobs differ by accumulation order only; tokens may part
    only at a near-tie (top-2 margin under 0.05 nats on CPU)."""
    name = f"{fmt} weights on {device}: greedy + top-20 logprobs == {fmt} on cpu"
    try:
        quant = _engine(folder, device, "float32", weights=fmt)
    except ValueError as exc:
        return name, False, "refused: " + str(exc).splitlines()[0]
    ids, lps, _ = _run(quant, prompt, params)
    del quant
    ref_ids, ref_lps, _ = _run(_engine(folder, "cpu", "float32", weights=fmt), prompt, params)
    from mtpserve.decoding.tools.bench.compare import first_difference

    k = first_difference(ids, ref_ids)
    same = len(ids) if k is None else k
    worst = 0.0
    for got, want in zip(lps[:same], ref_lps[:same]):
        ref = dict(want.top)
        worst = max([worst] + [abs(v - ref[t]) for t, v in got.top if t in ref])
    ok = worst < 0.25 and len(ids) == len(ref_ids) == params.max_tokens
    if k is None:
        return name, ok, f"identical; max |logprob diff| {worst:.1e}"
    margin = ref_lps[k].top[0][1] - ref_lps[k].top[1][1] if k < len(ref_lps) else float("nan")
    return name, ok and margin < 0.05, (f"first difference at token {k}; cpu top-2 margin "
                                        f"{margin:.2e} nats; max |logprob diff| before {worst:.1e}")


def _same(name: str, a: list[int], b: list[int], ref: torch.Tensor) -> tuple[str, bool, str]:
    """ref: transformers' logprobs at each generated position (the tokens agree up to a
    difference, so its top-2 margin there is the one both runs saw)."""
    from mtpserve.decoding.tools.bench.compare import first_difference

    k = first_difference(a, b)
    if k is None:
        return name, True, "identical"
    margin = float("nan")
    if k < len(ref):
        top = torch.topk(ref[k], 2).values
        margin = float(top[0] - top[1])
    return name, False, f"first difference at token {k}; top-2 margin there {margin:.2e} nats"


def bench_argv(folder: Path, device: str, out: Path) -> list[str]:
    return ["bench", "--model", str(folder), "--device", device, "--dtype", "bfloat16",
            "--weights", "dense", "--prompts", str(PROMPTS), "--num-prompts", "8",
            "--max-tokens", "128", "--warmup", "1", "--batch-sizes", "1,16",
            "--transformers-batch-sizes", "1", "--plain", "--verify-curve", "--verify-runs", "15",
            "--out", str(out / "bench.json")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the default model's config and tokenizer files")
    p.add_argument("out", type=Path)
    p.add_argument("--num-layers", type=int, default=None,
                   help="decoder layers (default: the model's; fewer for a quick CPU run)")
    r = sub.add_parser("run", help="random weights of that shape, the checks, the benchmark")
    r.add_argument("folder", type=Path, help="what `prepare` wrote")
    r.add_argument("--device", default="cuda")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--out", type=Path, default=Path("device-check"), help="bench.json goes here")
    r.add_argument("--no-bench", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.out, a.num_layers)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="random-model-") as tmp:  # 0.5 GB, not in --out
        folder = Path(tmp)
        random_folder(a.folder, folder, seed=0)
        results = checks(folder, a.device, a.max_tokens)
        for name, ok, detail in results:
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if not a.no_bench:
            from mtpserve.decoding.tools.commands import register_offline_commands

            parser = argparse.ArgumentParser(prog="mtpserve")
            register_offline_commands(parser.add_subparsers(dest="command"))
            args = parser.parse_args(bench_argv(folder, a.device, a.out))
            args.func(args)
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
