"""The scheduler's step composition: decodes first, then prefill chunks in arrival order
under the per-step token budget, of which prefill gets at most `prefill_while_decoding`
tokens while anything decodes."""

from __future__ import annotations

import pytest

from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.scheduler import Scheduler, Sequence


def _seq(name: str, prompt_len: int, cached: int = 0) -> Sequence:
    return Sequence(request_id=name, prompt_len=prompt_len, token_ids=list(range(prompt_len)),
                    params=SamplingParams(), rule="greedy", speculate=False,
                    detok=None, stops=None, generator=None, num_cached=cached)


def _admitted(sched: Scheduler, *seqs: Sequence) -> None:
    slots = iter(range(100))
    for s in seqs:
        sched.add(s)
    sched.admit(lambda: next(slots))


def _prefill_tokens(step) -> dict[str, int]:
    return {s.seq.request_id: len(s.tokens) for s in step if s.tree is None}


def test_idle_engine_prefills_the_whole_budget():
    sched = Scheduler(8, prefill_chunk=256, max_tokens_per_step=1024)
    _admitted(sched, *(_seq(f"p{i}", 600) for i in range(5)))
    step = sched.schedule()
    assert _prefill_tokens(step) == {"p0": 256, "p1": 256, "p2": 256, "p3": 256}


def test_decodes_come_first_and_prefill_takes_the_rest_of_the_budget():
    sched = Scheduler(8, prefill_chunk=256, max_tokens_per_step=600)
    decoding = [_seq(f"d{i}", 10, cached=10) for i in range(3)]
    _admitted(sched, *decoding, *(_seq(f"p{i}", 600) for i in range(4)))
    step = sched.schedule()
    assert sorted(s.seq.request_id for s in step if s.tree is not None) == ["d0", "d1", "d2"]
    assert _prefill_tokens(step) == {"p0": 256, "p1": 256, "p2": 85}  # 600 - 3 decode rows
    assert [s.seq.slot for s in step] == sorted(s.seq.slot for s in step)  # slot order


def test_running_decodes_cap_the_prefill_tokens_of_a_step():
    sched = Scheduler(8, prefill_chunk=256, max_tokens_per_step=1024, prefill_while_decoding=300)
    _admitted(sched, _seq("d", 10, cached=10), *(_seq(f"p{i}", 600) for i in range(4)))
    assert _prefill_tokens(sched.schedule()) == {"p0": 256, "p1": 44}
    # nothing decoding: the whole budget, the cap does not apply
    sched = Scheduler(8, prefill_chunk=256, max_tokens_per_step=1024, prefill_while_decoding=300)
    _admitted(sched, *(_seq(f"p{i}", 600) for i in range(4)))
    assert sum(_prefill_tokens(sched.schedule()).values()) == 1024


def test_engine_config_carries_the_cap_to_the_scheduler(default_engine):
    from mtpserve.decoding.config import EngineConfig

    assert default_engine.scheduler.prefill_while_decoding == EngineConfig().prefill_while_decoding
    with pytest.raises(ValueError, match="prefill_while_decoding"):
        EngineConfig(prefill_while_decoding=0)
