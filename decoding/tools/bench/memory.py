"""Memory numbers of the plain section: the measured memory bandwidth, the bytes one decode
step streams (`model_bytes`; bandwidth / bytes is the batch-1 weight-streaming limit) and
the process's resident set.
"""

from __future__ import annotations

import itertools
import os
import resource
import statistics
import sys
import time

import torch

from .runs import sync


def measure_bandwidth(device: torch.device, gigabytes: float, runs: int = 5) -> float:
    """Bytes/s reading one big fp32 tensor (`x.sum()`, median of `runs`)."""
    x = torch.ones(int(gigabytes * 2**30) // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    del x
    return nbytes / statistics.median(times)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step streams: every weight once, packed projections included
    (rotary tables excluded; the embedding table too when the logits read their own copy
    of it, as the token lookup touches one row)."""
    seen, total = set(), 0
    unembed_t = getattr(model, "unembed_t", None)
    unembed_packed = getattr(model, "unembed_packed", None)  # opaque: no data_ptr
    unembed_fp16 = getattr(model, "unembed_fp16", None)  # FBGEMM's packed fp16: opaque too
    unembed_q8 = getattr(model, "unembed_q8", None)  # q8_unembed's blocks: a plain tensor
    own_copy = (unembed_t is not None or unembed_packed is not None or unembed_fp16 is not None
                or unembed_q8 is not None)
    named = itertools.chain(model.named_parameters(), model.named_buffers(),
                            [("unembed_t", unembed_t), ("unembed_q8", unembed_q8)])
    for name, t in named:
        if t is None or name.startswith("rope.") or t.data_ptr() in seen:
            continue
        if own_copy and name == "embed_tokens.weight":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    # projections (and the fp32 unembedding) stored in oneDNN's layout are not parameters
    packed_all = [getattr(m, "packed_weight", None) for m in model.modules()] + [unembed_packed]
    for packed in packed_all:
        if packed is not None:
            total += packed.numel() * packed.element_size()
    if unembed_fp16 is not None:
        total += model.config.vocab_size * model.config.hidden_size * 2
    return total


def current_rss_mb() -> float | None:
    """Resident set now (Linux): the steady state, where the peak includes loading."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20
