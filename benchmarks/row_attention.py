"""Row attention kernel (--attention-kernel rows) vs SDPA and attend_invariant.

Per layer call (us, median; the step's layout built once, as in the engine, and timed
apart): SDPA (attend_cached as without the kernel), attend_invariant (--batch-invariant on
without the kernel), the row kernel; for one decode row at several contexts, a 16-node tree,
and 16 sequences x 1 decode row at mixed contexts. Model shapes: SmolLM2-135M (9 query
heads, 3 KV heads, head dim 64). Then the whole engine (default weights): decode ms/step at
batch 1 and 16 and the verify curve, for --batch-invariant off/on x --attention-kernel
sdpa/rows, switched in one engine (the calls from_config makes), interleaved, min over
repeats.

    flock /tmp/cpu.lock python benchmarks/row_attention.py [--repeats 2] [--tokens 24]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtpserve.decoding.model import row_attention as ra
from mtpserve.decoding.model.attention import attend_cached, attend_invariant
from mtpserve.decoding.model.attention_metadata import AttentionMetadata, padded_layout
from mtpserve.decoding.model.kv_cache import KVCache
from mtpserve.decoding.spec.tree import DraftTree, load_choices

HQ, HKV, D, SCALE = 9, 3, 64, 0.125


def layout_meta(items: list[tuple[int, int, torch.Tensor | None]]) -> AttentionMetadata:
    """items: (slot, committed length, own mask [n, n] or None: one decode row)."""
    own = [m if m is not None else torch.ones(1, 1, dtype=torch.bool) for _, _, m in items]
    counts = [m.shape[0] for m in own]
    B, lq = len(items), max(counts)
    kv_len = max(s + n for (_, s, _), n in zip(items, counts))
    mask = None
    if B > 1 or lq > 1:
        mask = torch.zeros(B, 1, lq, kv_len, dtype=torch.bool)
        for b, ((_, s, _), m) in enumerate(zip(items, own)):
            mask[b, 0, :counts[b], :s] = True
            mask[b, 0, :counts[b], s:s + counts[b]] = m
            mask[b, 0, counts[b]:, 0] = True
    qg, qs = padded_layout(counts)
    e = torch.empty(0, dtype=torch.long)
    slots = [s for s, _, _ in items]
    contiguous = slots == list(range(slots[0], slots[0] + B))
    return AttentionMetadata(positions=e, token_slots=e, token_store=e,
                             seq_slots=torch.tensor(slots), slot_start=slots[0] if contiguous else None,
                             kv_len=kv_len, num_seqs=B, q_len=lq, q_gather=qg, q_scatter=qs,
                             mask=mask)


def _us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def micro_cases(g: torch.Generator) -> list[tuple[str, list[tuple[int, int, torch.Tensor | None]]]]:
    """The layouts timed per layer call: (name, layout_meta items)."""
    choices = load_choices("tree16")
    # a 16-node tree: the preset's shape (paths of child indices)
    parents = [-1]
    index = {(): 0}
    for path in sorted(choices, key=len):
        path = tuple(path)
        if path in index or path[:-1] not in index:
            continue
        index[path] = len(parents)
        parents.append(index[path[:-1]])
    parents = parents[:16]
    tree = DraftTree(tokens=[0] * len(parents), parents=parents).ancestor_mask()
    ctxs = torch.randint(64, 2000, (16,), generator=g).tolist()
    cases = [(f"decode, context {c}", [(0, c, None)]) for c in (128, 512, 2048)]
    cases.append((f"{len(parents)}-node tree, context 300", [(0, 300, tree)]))
    cases.append(("16 seqs x 1 row, contexts 64..2000", [(s, ctxs[s], None) for s in range(16)]))
    return cases


def micro() -> None:
    kv = KVCache.__new__(KVCache)
    kv.buf = torch.randn(1, 2, 16, HKV, 2100, D)
    g = torch.Generator().manual_seed(0)
    cases = micro_cases(g)
    print(f"threads {torch.get_num_threads()}, kernel path: "
          f"{ra.kernel_path()}\n")
    print("| per layer call, us (median) | SDPA | attend_invariant | rows kernel | rows vs SDPA | "
          "layout once per step (rows) |")
    print("|---|---|---|---|---|---|")
    for name, items in cases:
        meta = layout_meta(items)
        T = sum(m.shape[0] if m is not None else 1 for _, _, m in items)
        q = torch.randn(T, HQ, D, generator=g)
        sdpa = _us(lambda: attend_cached(q, kv, 0, meta, SCALE))
        attend_invariant(q, kv, 0, meta, SCALE)
        inv = _us(lambda: attend_invariant(q, kv, 0, meta, SCALE))
        ra.attend_rows(q, kv, 0, meta, SCALE)
        rows = _us(lambda: ra.attend_rows(q, kv, 0, meta, SCALE))
        layout = _us(lambda: ra.row_layout(meta, T), 100)
        print(f"| {name} | {sdpa:.1f} | {inv:.1f} | {rows:.1f} | {sdpa / rows:.2f}x | {layout:.1f} |")


def engine(repeats: int, tokens: int, batch: int, ks: list[int]) -> None:
    from compiled_step import decode_ms_per_step  # noqa: E402 - sibling script
    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.tools.bench.prompts import encode_prompts, load_prompts
    from mtpserve.decoding.tools.bench.verify_curve import verify_curve

    eng = LLMEngine.from_config(EngineConfig(max_num_seqs=batch, max_model_len=1024,
                                             spec=SpecConfig(mode="off")))
    _, raw = load_prompts(None, batch)
    prompts = encode_prompts(eng.tokenizer, raw)
    configs = [(inv, k) for inv in (False, True) for k in ("sdpa", "rows")]

    def use(inv: bool, kernel: str) -> None:
        eng.model.set_batch_invariant(inv)
        eng.model.set_attention_kernel(kernel, eng.kv_dtype)

    res: dict[tuple, dict[str, float]] = {c: {} for c in configs}
    for _ in range(repeats):
        for c in configs:
            use(*c)
            for label, ps in (("b1", prompts[:1]), (f"b{batch}", prompts[:batch])):
                ms = decode_ms_per_step(eng, ps, tokens)
                res[c][label] = min(res[c].get(label, float("inf")), ms)
    filler = [t for p in prompts for t in p]
    for c in configs:
        use(*c)
        for row in verify_curve(eng, filler, 128, ks, 8):
            res[c][f"k{row['k']}"] = row["ms_min"]
    print(f"\nengine: weights {eng.weight_format}, min over {repeats} repeats of {tokens} "
          "decode steps; verify curve at context 128 (ms per forward + logits, min)\n")
    head = " | ".join(f"inv {'on' if i else 'off'}, {k}" for i, k in configs)
    print(f"| measure | {head} | inv on cost (sdpa) | inv on cost (rows) |")
    print("|---" * (len(configs) + 3) + "|")
    labels = ["b1", f"b{batch}"] + [f"k{k}" for k in ks]
    for lab in labels:
        v = [res[c][lab] for c in configs]
        name = (f"decode batch {lab[1:]} ms/step" if lab.startswith("b")
                else f"verify k={lab[1:]} ms")
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in v)
              + f" | {v[2] / v[0]:.2f}x | {v[3] / v[1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    if not ra.available():
        raise SystemExit("the row attention kernel does not load here")
    with torch.inference_mode():
        if not args.skip_micro:
            micro()
    if not args.skip_engine:
        engine(args.repeats, args.tokens, args.batch, [int(x) for x in args.ks.split(",")])


if __name__ == "__main__":
    main()
