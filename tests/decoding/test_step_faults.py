"""A fault in the batched part of a step (forward, drafting) fails only the requests of that
step: their KV slots are freed, waiting requests go on, and the engine keeps serving with
outputs identical to a fresh engine's. Runs on a SEPARATE tiny random-weight engine
(float64: batch composition does not change greedy tokens)."""

from __future__ import annotations

import pytest

from decoding_helpers import greedy, run_requests, tiny_engine
from mtpserve.decoding.engine.runner import EngineRunner
from mtpserve.decoding.engine.scheduler import Status

INJECTED = "injected batch fault"
PROMPTS = [[11, 12, 13, 14, 15], [5, 6, 7, 5, 6, 7], [300, 301, 302], [42] * 8]


@pytest.fixture(scope="module")
def tiny(default_engine):
    return tiny_engine(default_engine.tokenizer, max_num_seqs=3)  # the 4th request waits


@pytest.fixture(scope="module")
def alone(tiny) -> list[list[int]]:
    """Greedy tokens of each prompt decoded alone, before any fault."""
    return [run_requests(tiny, [(p, greedy(12, ignore_eos=True))])[0].token_ids
            for p in PROMPTS]


@pytest.fixture(autouse=True)
def _clean(tiny):
    yield
    tiny.batch_fault_hook = None
    tiny.failed_steps_in_a_row = 0
    for rid in list(tiny._seqs):
        tiny.abort_request(rid)


class BatchFault:
    """batch_fault_hook raising once, when `when(seqs)` holds; records the batch it hit."""

    def __init__(self, when) -> None:
        self.when = when
        self.hit: list[str] | None = None

    def __call__(self, seqs) -> None:
        if self.hit is None and self.when(seqs):
            self.hit = [s.request_id for s in seqs]
            raise RuntimeError(INJECTED)


def test_batch_fault_fails_its_step_frees_slots_and_spares_waiting(tiny, alone):
    rids = [f"bf-{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(rids, PROMPTS):
        tiny.add_request(rid, prompt, greedy(12, ignore_eos=True))
    outs: dict[str, list] = {rid: [] for rid in rids}
    # Fault once all three running requests are decoding (past their prefill).
    fault = BatchFault(lambda seqs: len(seqs) == 3 and all(s.num_emitted >= 2 for s in seqs))
    tiny.batch_fault_hook = fault
    for _ in range(200):
        if fault.hit is not None:
            break
        for out in tiny.step():
            outs[out.request_id].append(out)
    assert sorted(fault.hit) == rids[:3]  # the fourth was waiting for a slot

    for rid in rids[:3]:  # each finished exactly once, with the error naming the fault
        last = outs[rid][-1]
        assert last.finished and last.finish_reason == "error"
        assert INJECTED in last.error and "RuntimeError" in last.error
        assert sum(o.finished for o in outs[rid]) == 1
        assert rid not in tiny._seqs
        tokens = [t for o in outs[rid] for t in o.new_token_ids]
        assert 2 <= len(tokens) < 12 and tokens == alone[rids.index(rid)][:len(tokens)]
    assert tiny.kv.num_free == tiny.kv.num_slots  # no slot leaked
    waiting = tiny._seqs[rids[3]]
    assert waiting.status is Status.WAITING and not outs[rids[3]]

    tiny.batch_fault_hook = None
    while tiny.has_unfinished():  # the waiting request goes on as if nothing happened
        for out in tiny.step():
            outs[out.request_id].append(out)
    assert outs[rids[3]][-1].finish_reason == "length"
    assert [t for o in outs[rids[3]] for t in o.new_token_ids] == alone[3]
    # and the engine serves new requests exactly as before the fault
    again = run_requests(tiny, [(p, greedy(12, ignore_eos=True)) for p in PROMPTS[:3]])
    assert [r.token_ids for r in again] == alone[:3]
    assert all(r.last.finish_reason == "length" for r in again)
    assert tiny.kv.num_free == tiny.kv.num_slots and not tiny.has_unfinished()


def test_fault_after_outputs_keeps_the_ones_already_final(tiny, alone, monkeypatch):
    """A fault in drafting, after acceptance: a request that finished in that step keeps its
    normal final output; one still running fails with the error after its delta."""
    tiny.add_request("late-run", PROMPTS[0], greedy(12, ignore_eos=True))
    outs: dict[str, list] = {"late-run": [], "late-done": []}
    while not any(o.new_token_ids for o in outs["late-run"]):  # past its prefill
        for out in tiny.step():
            outs[out.request_id].append(out)
    tiny.add_request("late-done", PROMPTS[1], greedy(1, ignore_eos=True))  # done at prefill end

    def draft_fails(*args, **kwargs) -> None:
        raise RuntimeError(INJECTED)

    monkeypatch.setattr(tiny.drafter, "draft_next", draft_fails)
    for out in tiny.step():
        outs[out.request_id].append(out)
    monkeypatch.undo()

    done = outs["late-done"]
    assert len(done) == 1 and done[0].finish_reason == "length" and done[0].error is None
    assert done[0].new_token_ids == alone[1][:1]
    run = outs["late-run"]
    assert run[-1].finish_reason == "error" and INJECTED in run[-1].error
    assert sum(o.finished for o in run) == 1
    tokens = [t for o in run for t in o.new_token_ids]
    assert tokens == alone[0][:len(tokens)]
    assert tiny.kv.num_free == tiny.kv.num_slots and not tiny.has_unfinished()
    assert run_requests(tiny, [(PROMPTS[0], greedy(12, ignore_eos=True))])[0].token_ids == alone[0]


def test_runner_survives_a_batch_fault(tiny, alone):
    """The runner's catch-all is not reached: the thread lives on and serves the next request."""
    import queue

    fault = BatchFault(lambda seqs: True)
    tiny.batch_fault_hook = fault
    runner = EngineRunner(tiny)
    runner.start()
    try:
        got: queue.Queue = queue.Queue()
        runner.submit("rb-bad", PROMPTS[0], greedy(12, ignore_eos=True), got.put)
        out = got.get(timeout=60)
        assert out.finished and out.finish_reason == "error" and INJECTED in out.error
        runner.submit("rb-ok", PROMPTS[0], greedy(12, ignore_eos=True), got.put)
        tokens: list[int] = []
        while True:
            out = got.get(timeout=60)
            tokens.extend(out.new_token_ids)
            if out.finished:
                break
        assert out.finish_reason == "length" and tokens == alone[0]
        assert runner.is_alive and runner.fatal_error is None
    finally:
        runner.stop()
    assert fault.hit == ["rb-bad"]
    assert tiny.kv.num_free == tiny.kv.num_slots and not tiny.has_unfinished()


def _always(seqs) -> None:
    raise RuntimeError(INJECTED)


def test_every_step_failing_stops_the_engine_after_a_limit(tiny, alone):
    """A broken engine (each step faults) must not look healthy forever: after
    MAX_FAILED_STEPS_IN_A_ROW failed steps in a row step() raises; one good step resets."""
    from mtpserve.decoding.engine.llm_engine import MAX_FAILED_STEPS_IN_A_ROW, EngineBroken

    def fail_steps(n: int, tag: str) -> None:
        for i in range(n):
            tiny.add_request(f"{tag}-{i}", PROMPTS[0], greedy(4, ignore_eos=True))
            assert [o.finish_reason for o in tiny.step()] == ["error"]

    tiny.batch_fault_hook = _always
    fail_steps(MAX_FAILED_STEPS_IN_A_ROW - 1, "a")
    tiny.batch_fault_hook = None
    assert run_requests(tiny, [(PROMPTS[0], greedy(12, ignore_eos=True))])[0].token_ids == alone[0]
    assert tiny.failed_steps_in_a_row == 0
    tiny.batch_fault_hook = _always
    fail_steps(MAX_FAILED_STEPS_IN_A_ROW - 1, "b")  # the good step reset the count
    tiny.add_request("b-last", PROMPTS[0], greedy(4, ignore_eos=True))
    with pytest.raises(EngineBroken, match=INJECTED):
        tiny.step()
    assert tiny.kv.num_free == tiny.kv.num_slots and not tiny.has_unfinished()


def test_runner_stops_and_reports_a_broken_engine(tiny):
    """Through the runner: every request of the failing steps gets an error, then the
    thread stops with fatal_error set (the server's /health turns to error on it)."""
    import queue

    from mtpserve.decoding.engine.llm_engine import MAX_FAILED_STEPS_IN_A_ROW, EngineBroken

    tiny.batch_fault_hook = _always
    runner = EngineRunner(tiny)
    runner.start()
    try:
        got: queue.Queue = queue.Queue()
        for i in range(MAX_FAILED_STEPS_IN_A_ROW):
            runner.submit(f"rx-{i}", PROMPTS[1], greedy(4, ignore_eos=True), got.put)
            out = got.get(timeout=60)
            assert out.finished and out.finish_reason == "error" and INJECTED in out.error
        runner._thread.join(timeout=60)
        assert not runner.is_alive and isinstance(runner.fatal_error, EngineBroken)
    finally:
        runner.stop()
