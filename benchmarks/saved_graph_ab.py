"""Does the saved graph (model/saved_graph.py) step as fast as dynamo's own compiled code?

Two CompiledTrunk instances over one engine's model in one process: `dynamo` compiles
through torch.compile (what a start did before graphs were saved), `saved` reads the graph
a previous start saved (or compiles it ahead and saves it: run twice to see it read). Each
times 30 calls of the trunk at 1, 4 and 16 rows, six alternating rounds; the table gives
the median ms per call and the ratio, and the script checks both give the same bits.

    .venv/bin/python benchmarks/saved_graph_ab.py
"""
from __future__ import annotations

import statistics
import time

import torch
from mtpserve.decoding.config import EngineConfig, SpecConfig
from mtpserve.decoding.engine.llm_engine import LLMEngine
from mtpserve.decoding.model.compiled import CompiledTrunk


def main() -> None:
    eng = LLMEngine.from_config(EngineConfig(spec=SpecConfig(mode="off"), compile="off"))
    arms = {}
    for save in (False, True):
        ct = CompiledTrunk(eng.model, "max-autotune-no-cudagraphs", save=save)
        slot = eng.kv.allocate(); ct.warm_up(eng.kv, slot); eng.kv.free(slot)
        arms["saved" if save else "dynamo"] = ct
        print(("saved" if save else "dynamo"), "compiles", ct.compiles, "loaded", ct.loaded, flush=True)
    slot = eng.kv.allocate()
    res = {(a, r): [] for a in arms for r in (1, 4, 16)}
    with torch.inference_mode():
        for rnd in range(6):
            for rows in (1, 4, 16):
                for name, ct in (list(arms.items()) if rnd % 2 == 0 else list(arms.items())[::-1]):
                    ids, meta = ct._warm_inputs(eng.kv, slot, rows)
                    for _ in range(3): ct(ids, meta, eng.kv)
                    t0 = time.perf_counter()
                    for _ in range(30): ct(ids, meta, eng.kv)
                    res[(name, rows)].append((time.perf_counter() - t0) / 30 * 1000)
        a = arms["saved"](*arms["saved"]._warm_inputs(eng.kv, slot, 5), eng.kv)
        b = arms["dynamo"](*arms["dynamo"]._warm_inputs(eng.kv, slot, 5), eng.kv)
    print("bitwise equal hidden rows (5 rows):", torch.equal(a, b))
    print("| rows | dynamo ms (median of 6) | saved ms | saved/dynamo |")
    for rows in (1, 4, 16):
        d, s = statistics.median(res[("dynamo", rows)]), statistics.median(res[("saved", rows)])
        print(f"| {rows} | {d:.2f} | {s:.2f} | {s/d:.3f} |")


if __name__ == "__main__":
    main()
