"""EngineRunner: the thread-safe API over a SEPARATE tiny random-weight engine (float64, the
default tokenizer's vocabulary). Requests come from several threads; each must get its own
complete outputs, in order, equal to the same request decoded alone."""

from __future__ import annotations

import threading
import time

import pytest

from decoding_helpers import greedy, run_requests, tiny_engine
from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.engine.runner import EngineRunner

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def tiny(default_engine):
    return tiny_engine(default_engine.tokenizer, max_num_seqs=4)


class Collector:
    """Per-request outputs as the runner delivers them (called from the engine thread)."""

    def __init__(self) -> None:
        self.outputs: dict[str, list] = {}
        self.done: dict[str, threading.Event] = {}
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def callback(self, rid: str):
        self.outputs[rid] = []
        self.done[rid] = threading.Event()

        def on_output(out):
            assert out.request_id == rid
            with self.lock:
                self.outputs[rid].append(out)
                self.threads.add(threading.current_thread().name)
            if out.finished:
                self.done[rid].set()
        return on_output

    def wait(self, rids) -> None:
        for rid in rids:
            assert self.done[rid].wait(TIMEOUT), f"{rid} did not finish"


def _wait_idle(runner: EngineRunner) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        s = runner.stats()
        if s.num_running == 0 and s.num_waiting == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"runner not idle: {runner.stats()}")


def _requests():
    """(prompt, params) of different lengths, limits, speculation and sampling."""
    return [
        ([11, 12, 13, 14, 15], greedy(20, ignore_eos=True)),
        ([300, 301], greedy(7, ignore_eos=True, speculate=False)),
        ([5, 6, 7, 5, 6, 7, 5, 6, 7], greedy(15, ignore_eos=True)),
        ([42] * 12, SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)),
        ([1000, 2000, 3000, 4000], greedy(3, ignore_eos=True)),
        ([77, 78], SamplingParams(max_tokens=9, temperature=0.5, seed=8, ignore_eos=True,
                                  speculate=False)),
    ]


def test_threads_get_their_own_complete_ordered_outputs(tiny):
    reqs = _requests()
    # Reference: each request decoded alone, directly on the engine (greedy and seeded
    # sampling are deterministic; float64 makes batch composition irrelevant).
    alone = [run_requests(tiny, [r])[0].token_ids for r in reqs]
    steps0, gen0 = tiny.num_steps, tiny.generated_tokens
    runner = EngineRunner(tiny)
    runner.start()
    col = Collector()
    rids = [f"thread-req-{i}" for i in range(len(reqs))]
    try:
        def client(idxs):
            for i in idxs:
                prompt, params = reqs[i]
                runner.submit(rids[i], prompt, params, col.callback(rids[i]))

        threads = [threading.Thread(target=client, args=([i, i + 3],)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        col.wait(rids)
        _wait_idle(runner)
        stats = runner.stats()
    finally:
        runner.stop()
    assert col.threads == {"mtpserve-engine"}  # callbacks come from the engine thread only
    total = 0
    for i, rid in enumerate(rids):
        outs = col.outputs[rid]
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == alone[i], rid
        assert len(tokens) == reqs[i][1].max_tokens
        # In order: cumulative counts grow by each delta; only the last one is final.
        counts = [o.num_output_tokens for o in outs]
        assert counts == [sum(len(o.new_token_ids) for o in outs[:k + 1])
                          for k in range(len(outs))]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
        assert all(o.num_prompt_tokens == len(reqs[i][0]) for o in outs)
        total += len(tokens)
    assert stats.generated_tokens - gen0 == total
    assert stats.num_steps > steps0
    assert stats.kv_cache_usage == 0.0
    assert not runner.is_alive


def test_abort_through_the_runner(tiny):
    runner = EngineRunner(tiny)
    runner.start()
    col = Collector()
    try:
        first = threading.Event()
        cb = col.callback("runner-abort")

        def on_output(out):
            cb(out)
            first.set()

        runner.submit("runner-abort", [9, 8, 7], greedy(200, ignore_eos=True), on_output)
        runner.submit("runner-keep", [9, 8, 7], greedy(5, ignore_eos=True),
                      col.callback("runner-keep"))
        assert first.wait(TIMEOUT)
        runner.abort("runner-abort")
        col.wait(["runner-abort", "runner-keep"])
        _wait_idle(runner)
        n_free = tiny.kv.num_free
    finally:
        runner.stop()
    outs = col.outputs["runner-abort"]
    assert outs[-1].finish_reason == "abort" and outs[-1].finished
    assert sum(o.finished for o in outs) == 1  # nothing after the abort
    assert outs[-1].num_output_tokens == sum(len(o.new_token_ids) for o in outs) < 200
    assert [o.finish_reason for o in col.outputs["runner-keep"]][-1] == "length"
    assert n_free == tiny.kv.num_slots and not tiny.has_unfinished()


def test_submit_validates_in_the_callers_thread(tiny):
    runner = EngineRunner(tiny)  # not started: validation needs no engine thread
    cb = Collector().callback("x")
    with pytest.raises(ValueError, match="empty"):
        runner.submit("x", [], greedy(4), cb)
    with pytest.raises(ValueError, match="token ids"):
        runner.submit("x", [tiny.model_config.vocab_size], greedy(4), cb)
    with pytest.raises(ValueError, match="maximum context length"):
        runner.submit("x", [1] * 200, greedy(100), cb)


def test_broken_callback_does_not_break_the_engine(tiny):
    runner = EngineRunner(tiny)
    runner.start()
    col = Collector()
    try:
        def broken(out):
            raise RuntimeError("consumer went away (expected in this test)")

        runner.submit("runner-broken", [3, 4], greedy(4, ignore_eos=True), broken)
        runner.submit("runner-ok", [3, 4], greedy(6, ignore_eos=True), col.callback("runner-ok"))
        col.wait(["runner-ok"])
        _wait_idle(runner)
        assert runner.is_alive and runner.fatal_error is None
    finally:
        runner.stop()
    assert sum(len(o.new_token_ids) for o in col.outputs["runner-ok"]) == 6
    assert not tiny.has_unfinished()


def test_duplicate_id_is_refused_without_hijacking_the_original(tiny):
    runner = EngineRunner(tiny)
    runner.start()
    col, dup = Collector(), Collector()
    try:
        runner.submit("runner-dup", [3, 4], greedy(30, ignore_eos=True), col.callback("runner-dup"))
        runner.submit("runner-dup", [5, 6], greedy(3, ignore_eos=True), dup.callback("runner-dup"))
        dup.wait(["runner-dup"])
        assert dup.outputs["runner-dup"][-1].finish_reason == "error"
        assert "duplicate" in dup.outputs["runner-dup"][-1].error
        # The original request still completes, delivered to ITS callback.
        assert col.done["runner-dup"].wait(5.0), "the original request lost its callback"
        outs = col.outputs["runner-dup"]
        assert outs[-1].finish_reason == "length"
        assert sum(len(o.new_token_ids) for o in outs) == 30
    finally:
        runner.stop()
        tiny.abort_request("runner-dup")  # the orphaned original, if the bug left one


def test_stop_aborts_running_requests(tiny):
    runner = EngineRunner(tiny)
    runner.start()
    col = Collector()
    started = threading.Event()
    cb = col.callback("runner-stop")

    def on_output(out):
        cb(out)
        started.set()

    runner.submit("runner-stop", [1, 2, 3], greedy(200, ignore_eos=True), on_output)
    assert started.wait(TIMEOUT)
    runner.stop()
    assert col.done["runner-stop"].is_set()
    assert col.outputs["runner-stop"][-1].finish_reason == "abort"
    assert not tiny.has_unfinished() and tiny.kv.num_free == tiny.kv.num_slots
