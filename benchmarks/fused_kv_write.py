"""The K/V write fused into the row attention kernel (`write_row_attention`) vs the write
as its own ops (stack + cast + index_put, then `row_attention`): decode ms/step at batch 1
and batch N and a verify pass of k tree rows, default weights, eager and compiled. One
engine per mode; the two paths alternate on it (the split one is patched in for its
turns), min over repeats; greedy tokens must be equal.

    python benchmarks/fused_kv_write.py [--tokens 48] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from compiled_step import decode_ms_per_step, greedy_tokens
from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model import attention
from mtpserve.decoding.model.row_attention import attend_rows
from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
from mtpserve.decoding.tools.bench.verify_curve import verify_curve


def _split(q, k, v, kv, layer, meta, scale):
    kv.write(layer, meta, k, v)
    return attend_rows(q, kv, layer, meta, scale)


@contextmanager
def path(name: str) -> Iterator[None]:
    """Within: write_and_attend's one-call path is the fused kernel (fused) or the write
    and the attention as before (split)."""
    fused = attention.write_attend_rows
    if name == "split":
        attention.write_attend_rows = _split
    try:
        yield
    finally:
        attention.write_attend_rows = fused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=8, help="verify rows")
    ap.add_argument("--context", type=int, default=300)
    args = ap.parse_args()
    base = {"spec": SpecConfig(mode="off"), "max_num_seqs": args.batch, "max_model_len": 512}
    _, raw = load_prompts(None, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n| engine | measure (min over repeats) | split write | fused | speedup | greedy equal |")
    print("|---|---|---|---|---|---|")
    for mode in ("off", "on"):
        eng = LLMEngine.from_config(EngineConfig(**base, compile=mode))
        prompts = encode_prompts(eng.tokenizer, raw)
        if eng.model.attention_kernel != "rows":
            raise SystemExit("the row attention kernel is not in use here: nothing to compare")
        with path("split"):
            ref = greedy_tokens(eng, prompts[0], 32)
        same = greedy_tokens(eng, prompts[0], 32) == ref
        res: dict[str, dict[str, float]] = {"split": {}, "fused": {}}
        filler = [t for p in prompts for t in p]
        for _ in range(args.repeats):
            for name in ("split", "fused"):
                with path(name):
                    for label, ps in (("b1", prompts[:1]), ("bN", prompts[:args.batch])):
                        ms = decode_ms_per_step(eng, ps, args.tokens)
                        res[name][label] = min(res[name].get(label, float("inf")), ms)
                    ms = verify_curve(eng, filler, args.context, [args.k], 5)[0]["ms_min"]
                    res[name]["k"] = min(res[name].get("k", float("inf")), ms)
        engine = f"compile {mode}"
        for label, what in (("b1", "decode batch 1 ms/step"),
                            ("bN", f"decode batch {args.batch} ms/step"),
                            ("k", f"verify k={args.k} ctx {args.context} ms")):
            s, f = res["split"][label], res["fused"][label]
            print(f"| {engine} | {what} | {s:.2f} | {f:.2f} | {s / f:.3f}x | {same} |")


if __name__ == "__main__":
    main()
