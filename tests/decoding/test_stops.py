"""Invariant 5 on the default model: stop strings, stop token ids, max_tokens and EOS are
honoured exactly even when one verify step accepts several tokens; abort frees the slot.

The reference is the plain greedy run of a prompt the model continues by repetition, so
n-gram drafting accepts several tokens per step; the speculative run's step boundaries
(`deltas`) tell where a step emitted more than one token, and each limit is placed inside
such a step: the engine must cut the step's tokens, text and usage at that point.
"""

from __future__ import annotations

import pytest

from decoding_helpers import REP_MAX, REPETITIVE, cached_run, chat, greedy, run_requests
from mtpserve.decoding.config import SamplingParams

N = REP_MAX  # the reference runs are shared with test_greedy_invariants


@pytest.fixture(scope="module")
def ref(default_engine):
    eng = default_engine
    prompt = eng.tokenizer.encode(REPETITIVE)
    plain = cached_run(eng, prompt, greedy(N, speculate=False))
    spec = cached_run(eng, prompt, greedy(N))
    assert spec.token_ids == plain.token_ids and len(plain.token_ids) == N
    starts = []  # (start, end) output indices of each speculative step's tokens
    pos = 0
    for d in spec.deltas:
        starts.append((pos, pos + len(d)))
        pos += len(d)
    multi = [(a, b) for a, b in starts if b - a >= 3]
    assert multi, f"no step accepted several tokens: {spec.deltas}"
    return {"prompt": prompt, "plain": plain, "spec": spec, "steps": starts, "multi": multi}


def _text_upto(tok, ids):
    return tok.decode(ids)


def _pick_stop(tok, out: list[int], m: int, full_text: str) -> str:
    """A stop string spanning the end of token m-1 and all of token m's text, whose first
    occurrence in the output completes exactly at token m."""
    upto = _text_upto(tok, out[:m + 1])
    before = _text_upto(tok, out[:m])
    assert full_text.startswith(upto) and len(upto) > len(before)
    for k in range(len(upto) - len(before) + 2, len(upto) + 1):
        stop = upto[-k:]
        if stop.strip() and full_text.find(stop) == len(upto) - k:
            return stop
    raise AssertionError("no usable stop string")


@pytest.mark.parametrize("where", ["mid-step", "across-steps"])
def test_stop_string_cuts_inside_a_multi_token_step(default_engine, ref, where):
    eng, tok = default_engine, default_engine.tokenizer
    out, text = ref["plain"].token_ids, ref["plain"].text
    a, b = ref["multi"][0]
    m = a + 1 if where == "mid-step" else b  # b: first token of the following step
    stop = _pick_stop(tok, out, m, text)
    cut = text[:text.find(stop)]
    before = eng.generated_tokens
    run, = run_requests(eng, [(ref["prompt"], greedy(N, stop=(stop,)))])
    last = run.last
    assert eng.generated_tokens - before == m + 1  # engine-wide usage: nothing past the stop
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert run.text == cut  # the plain text cut before the stop string, nothing after
    assert stop not in run.text
    assert run.token_ids == out[:m + 1]  # up to and including the token completing it
    assert last.num_output_tokens == m + 1
    if where == "mid-step":
        # The completing step accepted tokens beyond the stop point and dropped them.
        assert run.deltas[-1] == out[a:m + 1] and len(run.deltas[-1]) >= 2
        assert b > m + 1


def test_stop_string_absent_releases_held_text(default_engine, ref):
    """The run ends while its text ends in a proper prefix of the stop string: the matcher
    held that tail back and must release it when max_tokens ends the request."""
    tok = default_engine.tokenizer
    n = ref["multi"][0][1]  # the end of a multi-token step
    text_n = _text_upto(tok, ref["plain"].token_ids[:n])
    stop = text_n[-3:] + "!!"
    assert stop not in text_n
    run, = run_requests(default_engine, [(ref["prompt"], greedy(n, stop=(stop,)))])
    assert run.last.finish_reason == "length"
    assert run.token_ids == ref["plain"].token_ids[:n]
    assert run.text == text_n  # including the held-back tail
    assert run.outputs[-1].new_text.endswith(text_n[-3:])


def test_stop_token_id_inside_a_multi_token_step(default_engine, ref):
    out = ref["plain"].token_ids
    pick = next(((a, m) for a, b in ref["multi"] for m in range(a + 1, b - 1)
                 if out[m] not in out[:m]), None)
    assert pick is not None, "no fresh token strictly inside a multi-token step"
    a, m = pick
    run, = run_requests(default_engine,
                        [(ref["prompt"], greedy(N, stop_token_ids=(out[m],)))])
    assert run.last.finish_reason == "stop" and run.last.stop_reason == out[m]
    assert run.token_ids == out[:m + 1]
    assert run.last.num_output_tokens == m + 1
    assert run.deltas[-1] == out[a:m + 1]
    # The stop token's own text is the last text sent (tokens after it: none).
    assert run.text == _text_upto(default_engine.tokenizer, out[:m + 1])


def test_max_tokens_exact_inside_a_multi_token_step(default_engine, ref):
    eng = default_engine
    out = ref["plain"].token_ids
    a, b = ref["multi"][0]
    limit = a + 2  # the step would emit b - a >= 3 tokens; only 2 of them fit
    before, free0 = eng.generated_tokens, eng.kv.num_free
    run, = run_requests(eng, [(ref["prompt"], greedy(limit))])
    assert eng.kv.num_free == free0 and not eng.has_unfinished()  # the slot came back
    assert run.last.finish_reason == "length"
    assert run.token_ids == out[:limit] and len(run.token_ids) == limit
    assert run.last.num_output_tokens == limit
    assert run.deltas[-1] == out[a:limit]
    assert run.text == _text_upto(eng.tokenizer, out[:limit])
    assert eng.generated_tokens - before == limit  # engine-wide usage counts no extra token


def test_eos_stops_and_ignore_eos_continues(default_engine):
    eng = default_engine
    prompt = chat(eng.tokenizer, "What is 2+2? Reply with just the number.")
    limit = 12
    # One batch: the same prompt with EOS honoured and with EOS ignored.
    run, cont = run_requests(eng, [(prompt, greedy(limit)),
                                   (prompt, greedy(limit, ignore_eos=True))])
    ids = run.token_ids
    assert run.last.finish_reason == "stop" and run.last.stop_reason is None
    assert ids[-1] in eng.eos_ids and not set(ids[:-1]) & eng.eos_ids
    assert len(ids) < limit and run.last.num_output_tokens == len(ids)
    assert run.text == eng.tokenizer.decode(ids[:-1]) and run.text.strip()
    # EOS ignored: it runs to max_tokens through the EOS token.
    assert cont.last.finish_reason == "length"
    assert len(cont.token_ids) == limit and cont.token_ids[:len(ids)] == ids


def test_abort_mid_generation_frees_the_slot(default_engine, ref):
    eng = default_engine
    assert not eng.has_unfinished()
    free0 = eng.kv.num_free
    steps0 = eng.num_steps
    eng.add_request("stops-abort-running", ref["prompt"], greedy(40))
    eng.add_request("stops-abort-sampled", ref["prompt"],
                    SamplingParams(max_tokens=40, temperature=0.7, seed=1))
    got = []
    try:
        for _ in range(3):
            got += [o for o in eng.step() if o.request_id == "stops-abort-running"]
        assert got and not got[-1].finished
        assert eng.kv.num_free == free0 - 2
        n_sent = sum(len(o.new_token_ids) for o in got)
        res = eng.abort_request("stops-abort-running")
        assert len(res) == 1
        r = res[0]
        assert r.finished and r.finish_reason == "abort" and r.new_token_ids == []
        assert r.num_output_tokens == n_sent
        assert eng.kv.num_free == free0 - 1
        # A request aborted before it was ever scheduled holds no slot.
        eng.add_request("stops-abort-waiting", ref["prompt"], greedy(N))
        assert eng.abort_request("stops-abort-waiting")[0].finish_reason == "abort"
        assert eng.kv.num_free == free0 - 1
        # The other request goes on unaffected; aborting it too empties the engine.
        assert any(o.request_id == "stops-abort-sampled" for o in eng.step())
        assert eng.abort_request("stops-abort-sampled")[0].finish_reason == "abort"
        assert eng.kv.num_free == free0
        assert not eng.has_unfinished()
        assert eng.step() == []
        assert eng.abort_request("stops-abort-running") == []  # unknown now: no output
        stats = eng.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0
        assert stats.num_steps >= steps0 + 4
    finally:
        for rid in ("stops-abort-running", "stops-abort-sampled", "stops-abort-waiting"):
            eng.abort_request(rid)
