"""The transformers baseline of the plain section: the same weights, dtype and token ids
through transformers' `generate`, timed like the engine (`BatchRun` rows).

transformers is optional: it is imported inside the functions only.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .runs import BatchRun, batches, print_progress, sync, throughput_row


def load_transformers_model(model_path: str, dtype: torch.dtype, device: torch.device,
                            gguf: str = "dense"):
    """(model, None) or (None, reason). transformers is optional: imported here only."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None, "transformers is not installed (pip install 'mtpserve[test]')"
    try:  # transformers >= 5 keeps GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig
    except ImportError:  # older: always dequantized
        GgufConfig = None  # noqa: N806
    if os.path.isdir(model_path) and os.path.exists(os.path.join(model_path, "config.json")):
        src, kw = model_path, {}
    else:
        if os.path.isdir(model_path):
            ggufs = sorted(f for f in os.listdir(model_path) if f.endswith(".gguf"))
            model_path = os.path.join(model_path, ggufs[0])
        src, kw = os.path.dirname(model_path), {"gguf_file": os.path.basename(model_path)}
        if GgufConfig is not None:
            kw["quantization_config"] = GgufConfig(dequantize=gguf == "dense")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    return model.to(device).eval(), None


def bench_transformers(model, args: argparse.Namespace, prompt_ids: list[list[int]],
                       batch_sizes: list[int], eos_ids: set[int]) -> list[dict]:
    """`generate`, greedy, fixed output length (min_new_tokens), left padding for batch > 1.
    A logits processor timestamps every step: the first call ends prefill."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            sync(scores.device)
            self.times.append(time.perf_counter())
            return scores

    device = next(model.parameters()).device
    pad_id = min(eos_ids) if eos_ids else 0

    def until_eos(row: list[int]) -> list[int]:  # with --eos, finished rows are padded
        if not args.eos:
            return row
        return next((row[:i + 1] for i, t in enumerate(row) if t in eos_ids), row)

    def run(group: list[list[int]], max_new: int) -> BatchRun:
        width = max(len(x) for x in group)
        ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in group], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in group], device=device)
        clock = StepClock()
        fixed = {} if args.eos else {"min_new_tokens": max_new}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad_id,
                                 logits_processor=LogitsProcessorList([clock]), **fixed)
        sync(device)
        end = time.perf_counter()
        new = [until_eos(row) for row in out[:, width:].tolist()]
        n_steps = len(clock.times)
        return BatchRun(sum(len(x) for x in new), end - t0, n_steps, clock.times[0] - t0,
                        n_steps - 1, len(group) * (n_steps - 1), new)

    rows = []
    for b in batch_sizes:
        groups = batches(prompt_ids, b)
        for _ in range(args.warmup):
            run(groups[0], min(16, args.max_tokens))
        runs = [run(g, args.max_tokens) for g in groups]
        rows.append({"impl": "transformers", "batch": b, **throughput_row(runs)})
        print_progress(rows[-1])
    return rows
