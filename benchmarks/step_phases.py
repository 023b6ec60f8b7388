"""Where a decode step's time goes, plain vs speculative, at batch 1: the engine's own step
phases (schedule, prepare, forward, logits, accept+commit+emit, draft the next tree) timed
with wall clocks around each call, median over many steps of one request.

Why: speculation pays only if a step with a tree costs little more than a plain step.
`bench --verify-curve` times the forward alone; this adds everything around it, so the
gap between the two is visible by phase.

    .venv/bin/python benchmarks/step_phases.py [--steps 96] [--tree chain2] [--proposer heads]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict

PHASES = ("_schedule", "_prepare", "_forward", "_logits", "_accept_commit_emit")


def timed_engine(engine, times: dict[str, list[float]]) -> None:
    """Wrap the engine's step phases (and drafting) so each call's seconds are recorded."""
    from mtpserve.decoding.engine.step_costs import sync

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            sync(engine.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(engine.device)
            times[label].append(time.perf_counter() - t0)
            return out
        setattr(obj, name, timed)

    for name in PHASES:
        wrap(engine, name, name.lstrip("_"))
    wrap(engine.drafter, "draft_next", "draft_next")
    wrap(engine, "step", "step (total)")


def run(engine, times: dict[str, list[float]], prompt: list[int], speculate: bool,
        steps: int) -> dict[str, float]:
    """Median ms per phase over `steps` decode steps of one request (after a warm-up)."""
    from mtpserve.decoding.config import SamplingParams

    engine.add_request("warm", prompt, SamplingParams(max_tokens=16, temperature=0.0,
                                                      speculate=speculate, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.add_request("r", prompt, SamplingParams(max_tokens=steps * 4, temperature=0.0,
                                                   speculate=speculate, ignore_eos=True))
    engine.step()  # prefill
    times.clear()
    n = 0
    tokens = 0
    while engine.has_unfinished() and n < steps:
        for out in engine.step():
            tokens += len(out.new_token_ids)
        n += 1
    engine.abort_request("r")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["tokens/step"] = tokens / max(n, 1)
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=96)
    p.add_argument("--tree", default="default", help="the heads' tree (default: theirs)")
    p.add_argument("--proposer", default="heads", choices=["heads", "ngram", "hybrid"])
    p.add_argument("--compile", default="auto", choices=["off", "on", "auto"])
    p.add_argument("--prompt", default="Explain how the gears on a bicycle work.")
    a = p.parse_args(argv)

    from mtpserve.decoding.config import EngineConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(EngineConfig(
        compile=a.compile, spec=SpecConfig(mode="on", proposer=a.proposer, tree=a.tree)))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": a.prompt}])
    times: dict[str, list[float]] = defaultdict(list)
    timed_engine(engine, times)
    chain = getattr(engine.heads, "compiled_chain", None)
    arms = [("plain", False, chain), ("spec", True, chain)]
    if chain is not None:  # the same steps with the draft chain eager, for its share
        arms.append(("spec, eager draft", True, None))
    rows: dict[str, dict[str, float]] = {}
    for _ in range(2):  # every arm twice, interleaved: the second run counts
        for name, spec, compiled in arms:
            engine.heads.compiled_chain = compiled
            rows[name] = run(engine, times, prompt, spec, a.steps)
    engine.heads.compiled_chain = chain
    keys = ["step (total)", *(n.lstrip("_") for n in PHASES), "draft_next", "tokens/step"]
    print(f"median ms per decode step, batch 1, {a.steps} steps, proposer {a.proposer}, "
          f"tree {a.tree}, weights {engine.weight_format}, "
          f"compiled trunk {engine.compiled is not None}, compiled draft chain "
          f"{chain is not None}")
    print(f"{'phase':22s}" + "".join(f"{name:>20s}" for name, _, _ in arms))
    for k in keys:
        print(f"{k:22s}" + "".join(f"{rows[name].get(k, 0.0):20.3f}" for name, _, _ in arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
