"""Invariants 1-3 end to end on the default model (fp32), through the shared engine.

(a) greedy output == transformers' greedy output (teacher-forced argmax over our whole output
    for every prompt, plus transformers' own `generate` for one prompt);
(b) speculative greedy == plain greedy, token for token (and speculation really happened);
(c) a sequence's greedy tokens do not depend on the batch it shares (lengths, max_tokens,
    speculation on/off, sampled neighbours);
(d) a verify step that accepted k drafts (the accepted branch NOT first in the tree, so the
    KV entries really move) leaves cache and next logits equal to a fresh prefill.
"""

from __future__ import annotations

import pytest
import torch

from decoding_helpers import (REP_MAX, REPETITIVE, cached_run, chat, greedy, hf_default_model,
                              prefill_hidden, prefill_logits, run_requests)
from mtpserve.decoding.config import SamplingParams
from mtpserve.decoding.spec.tree import DraftTree

CHAT_PROMPTS = ["Write a haiku about the sea.", "List three colors.", "Explain gravity to a child."]
MAX = 64  # speculative greedy run, checked against transformers over all of it
PLAIN_MAX = 16  # plain greedy run (decode steps are ~0.3 s of CPU each here: keep it short)
HF_EOS = 2  # transformers' generation_config stops on this id only


@pytest.fixture(scope="module")
def runs(default_engine):
    eng = default_engine
    prompts = [chat(eng.tokenizer, t) for t in CHAT_PROMPTS]
    rep = eng.tokenizer.encode(REPETITIVE)
    spec = run_requests(eng, [(p, greedy(MAX)) for p in prompts])
    plain = run_requests(eng, [(p, greedy(PLAIN_MAX, speculate=False)) for p in prompts])
    return {"prompts": prompts, "plain": plain, "spec": spec, "rep": rep,
            "rep_plain": cached_run(eng, rep, greedy(REP_MAX, speculate=False)),
            "rep_spec": cached_run(eng, rep, greedy(REP_MAX))}


def _check_finish(run, eos_ids, max_tokens):
    r = run.last
    assert r.finished
    if r.finish_reason == "length":
        assert len(run.token_ids) == max_tokens == r.num_output_tokens
    else:
        assert r.finish_reason == "stop" and run.token_ids[-1] in eos_ids


# -- (a) ---------------------------------------------------------------------------------------
def test_greedy_equals_transformers_teacher_forced(default_engine, runs):
    """Every token of the speculative greedy runs (B=3, 64 tokens) is transformers' argmax
    given the same prefix; (b) ties the plain runs to them."""
    hf = hf_default_model()
    for prompt, run in zip(runs["prompts"], runs["spec"]):
        out = run.token_ids
        _check_finish(run, default_engine.eos_ids, MAX)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0].float()
        pred = logits[len(prompt) - 1:len(prompt) - 1 + len(out)]
        hf_tokens = pred.argmax(-1).tolist()
        if hf_tokens != out:
            i = next(i for i, (a, b) in enumerate(zip(hf_tokens, out)) if a != b)
            top2 = pred[i].topk(2).values.tolist()
            pytest.fail(f"first divergence at output {i}: ours {out[i]}, transformers "
                        f"{hf_tokens[i]} (top-2 margin {top2[0] - top2[1]:.2e})")


def test_greedy_equals_transformers_generate(default_engine, runs):
    hf = hf_default_model()
    prompt, run = runs["prompts"][0], runs["spec"][0]
    ours = run.token_ids
    with torch.no_grad():
        gen = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long),
                          max_new_tokens=MAX, do_sample=False)[0, len(prompt):].tolist()
    n = len(ours)
    assert ours == gen[:n]
    if run.last.finish_reason == "stop":
        assert ours[-1] in default_engine.eos_ids
        if ours[-1] == HF_EOS:
            assert gen == ours  # transformers stopped at the same EOS
    else:
        assert n >= MAX


# -- (b) ---------------------------------------------------------------------------------------
def test_speculative_greedy_equals_plain_greedy(runs):
    drafted = 0
    for plain, spec in zip(runs["plain"], runs["spec"]):
        n = len(plain.token_ids)
        assert spec.token_ids[:n] == plain.token_ids
        if plain.last.finish_reason == "stop":
            assert spec.token_ids == plain.token_ids and spec.text == plain.text
        else:
            assert n == PLAIN_MAX and spec.text.startswith(plain.text)
        assert spec.last.spec.acceptance_rule == "greedy"
        assert plain.last.spec.num_spec_steps == 0  # speculate=False really drafted nothing
        drafted += spec.last.spec.num_draft_tokens
    assert drafted > 0


def test_speculative_greedy_equals_plain_on_repetitive_text(runs):
    plain, spec = runs["rep_plain"], runs["rep_spec"]
    assert spec.token_ids == plain.token_ids
    assert spec.text == plain.text
    assert len(spec.token_ids) == REP_MAX
    stats = spec.last.spec
    assert stats.mean_acceptance_length > 1.3, stats.to_dict()
    assert max(len(d) for d in spec.deltas) >= 3  # one step emitted several tokens
    assert len(spec.outputs) < len(plain.outputs)  # fewer steps than tokens


# -- (c) ---------------------------------------------------------------------------------------
def test_greedy_output_independent_of_batch(default_engine, runs):
    """References: the repetitive prompt decoded ALONE; the chat prompts' greedy runs
    (verified against transformers, one sequence at a time, by (a))."""
    prompts, spec = runs["prompts"], runs["spec"]
    batch = [
        (runs["rep"], greedy(REP_MAX)),  # short prompt, speculating, accepts a lot
        (prompts[1], greedy(12, speculate=False)),  # plain decode, finishes early
        (prompts[2], SamplingParams(max_tokens=6, temperature=0.8, seed=5)),  # sampled
        (prompts[0], greedy(20)),  # speculating, finishes last
    ]
    lens = {len(p) for p, _ in batch}
    assert len(lens) >= 3  # different prompt lengths: padded attention rows
    out = run_requests(default_engine, batch)
    assert out[0].token_ids == runs["rep_plain"].token_ids
    assert out[1].token_ids == spec[1].token_ids[:12]
    assert out[1].last.finish_reason == "length"
    assert out[3].token_ids == spec[0].token_ids[:20]
    sampled = out[2]
    assert sampled.last.finished and 1 <= len(sampled.token_ids) <= 6
    assert sampled.last.finish_reason in ("length", "stop")
    assert len({len(r.outputs) for r in out}) >= 2  # they did finish at different steps


# -- (d) ---------------------------------------------------------------------------------------
def test_accepted_branch_commits_kv_like_a_fresh_prefill(default_engine, runs):
    eng = default_engine
    prompt, ref = runs["prompts"][2], runs["spec"][2].token_ids
    assert len(ref) >= 24 and not set(ref[:24]) & eng.eos_ids  # every round has its truth
    vocab = eng.model_config.vocab_size
    captured: list[torch.Tensor] = []
    original = eng.model.compute_logits

    def capture(hidden):
        out = original(hidden)
        captured.append(out)
        return out

    rid = "invariants-tree-inject"
    eng.model.__dict__["compute_logits"] = capture
    try:
        eng.add_request(rid, prompt, greedy(24))
        emitted: list[int] = []
        while not emitted:  # prefill (one chunk) -> first token
            emitted += [t for o in eng.step() if o.request_id == rid for t in o.new_token_ids]
        seq = eng._seqs[rid]
        for _ in range(3):
            n_out = len(seq.output_ids)
            truth = ref[n_out:n_out + 3]
            tree = DraftTree.root_only(seq.token_ids[-1])
            tree.add_path([(truth[0] + 1) % vocab, truth[1]])  # decoy branch: nodes 1, 2
            tree.add_path(truth)  # the right branch: nodes 3, 4, 5
            seq.draft = tree
            start = seq.num_cached
            captured.clear()
            outs = [o for o in eng.step() if o.request_id == rid]
            assert outs[0].new_token_ids == ref[n_out:n_out + 4]  # 3 accepted + bonus
            emitted += outs[0].new_token_ids
            assert seq.num_cached == start + 4
            committed = seq.token_ids[:-1]  # the bonus token's K/V come with the next step
            assert len(committed) == seq.num_cached
            # This step's logits (rows = tree nodes) equal a fresh prefill at the same places:
            # row 0 is also "the next step" after the previous round's accepted path.
            step_logits = captured[0]
            fresh = prefill_logits(eng.model, committed)
            for node, pos in zip([0, 3, 4, 5], range(start, start + 4)):
                assert torch.allclose(step_logits[node], fresh[pos], atol=1e-3, rtol=0), node
                assert step_logits[node].argmax() == fresh[pos].argmax()
            # The cache row holds the accepted path, compacted: as a fresh prefill wrote it.
            _, kv = prefill_hidden(eng.model, [committed])
            n = seq.num_cached
            ours_kv = eng.kv.buf[:, :, seq.slot, :, :n]
            assert torch.allclose(ours_kv, kv.buf[:, :, 0, :, :n], atol=1e-3, rtol=1e-4)
        # The engine continues on its own drafts with the same greedy tokens.
        while rid in eng._seqs:
            emitted += [t for o in eng.step() if o.request_id == rid for t in o.new_token_ids]
        assert emitted == ref[:24]
    finally:
        del eng.model.__dict__["compute_logits"]
        eng.abort_request(rid)


def test_prompt_arriving_mid_decode_is_attended_apart_and_changes_nothing(default_engine, runs):
    """A prompt admitted while another sequence decodes: that step attends in two groups
    (the chunk alone, the decode unpadded) and both sequences' greedy tokens equal their
    runs alone."""
    eng = default_engine
    prompts, spec = runs["prompts"], runs["spec"]
    seen_groups: list[int] = []
    prepare = eng._prepare

    def spy(batch):
        ids, meta, rows = prepare(batch)
        seen_groups.append(0 if meta.groups is None else len(meta.groups))
        return ids, meta, rows

    eng._prepare = spy
    try:
        eng.add_request("first", prompts[0], greedy(20))
        outs: dict[str, list[int]] = {"first": [], "late": []}
        for step in range(200):
            if step == 3:
                eng.add_request("late", prompts[1], greedy(12, speculate=False))
            for out in eng.step():
                outs[out.request_id].extend(out.new_token_ids)
            if step > 3 and not eng._seqs:
                break
    finally:
        del eng._prepare
        for rid in ("first", "late"):
            eng.abort_request(rid)
    assert 2 in seen_groups[3:5]  # the late prompt's chunk beside the decode
    assert outs["first"] == spec[0].token_ids[:20]
    assert outs["late"] == spec[1].token_ids[:12]


def test_greedy_penalties_apply_with_the_steps_batched_argmax(default_engine):
    """The engine takes one argmax over the step's logits for its greedy sequences; a
    greedy request with penalties must still pick from the penalized logits, beside a
    penalty-free neighbour in the same steps. On the repetitive prompt the model's greedy
    output repeats itself; with the largest penalties it must differ and use more distinct
    tokens (the unpenalized argmax would give the neighbour's tokens exactly)."""
    prompt = default_engine.tokenizer.encode(REPETITIVE)
    plain, penalized = run_requests(default_engine, [
        (prompt, greedy(24, ignore_eos=True, speculate=False)),
        (prompt, greedy(24, ignore_eos=True, speculate=False, presence_penalty=2.0,
                        frequency_penalty=2.0))])
    assert len(plain.token_ids) == len(penalized.token_ids) == 24
    assert len(set(plain.token_ids)) < 20  # the test would prove little without repeats
    assert penalized.token_ids != plain.token_ids
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))
