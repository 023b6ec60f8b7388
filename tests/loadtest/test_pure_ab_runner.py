"""Pure parts of A/B analysis and load generation."""
import numpy as np
import pytest

from mtpserve.loadtest.ab import compare_speed, first_difference, token_at_char, top2_margin
from mtpserve.loadtest.client import build_body
from mtpserve.loadtest.config import Arm, LoadLevel, RequestConfig, deep_merge
from mtpserve.loadtest.records import RequestRecord, TokenLogprob
from mtpserve.loadtest.runner import build_items, poisson_arrivals
from mtpserve.loadtest.workloads import Prompt


def test_first_difference():
    assert first_difference("abc", "abc") is None
    assert first_difference("abXd", "abYd") == 2
    assert first_difference("ab", "abc") == 2


def test_token_at_char_and_margin():
    toks = [TokenLogprob(" w0", -0.1, [(" w0", -0.1), (" z", -0.4)]), TokenLogprob(" w1", -0.2)]
    assert [token_at_char(toks, i) for i in (0, 2, 3, 5, 6)] == [0, 0, 1, 1, None]
    assert top2_margin(toks[0]) == pytest.approx(0.3)
    assert top2_margin(toks[1]) is None


def test_build_items_interleaves_and_alternates():
    arms = [Arm("A", "http://h"), Arm("B", "http://h")]
    prompts = [Prompt(id=str(i), prompt=str(i)) for i in range(3)]
    items = build_items(prompts, arms, 4)
    assert [(it.prompt_index, it.arm.name) for it in items] == [
        (0, "A"), (0, "B"), (1, "B"), (1, "A"), (2, "A"), (2, "B"), (0, "B"), (0, "A")]


def test_poisson_arrivals():
    a = poisson_arrivals(2000, 4.0, seed=7)
    assert a == poisson_arrivals(2000, 4.0, seed=7)
    assert all(x < y for x, y in zip(a, a[1:]))
    assert np.mean(np.diff([0.0] + a)) == pytest.approx(0.25, rel=0.1)
    assert poisson_arrivals(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_body_merging_and_logprob_fields():
    arm = Arm("B", "http://h/v1", "m", extra_body={"speculation": {"enabled": True}})
    cfg = RequestConfig(max_tokens=8, ignore_eos=True,
                        extra_body={"speculation": {"tree": "t"}, "top_k": 1})
    body = build_body(arm, Prompt(id="p", prompt="hi", max_tokens=3), cfg, top_logprobs=5)
    assert body["speculation"] == {"tree": "t", "enabled": True}
    assert body["max_tokens"] == 3 and body["ignore_eos"] is True and body["top_k"] == 1
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["seed"] == 0
    comp = build_body(arm, Prompt(id="p", prompt="hi"), RequestConfig(endpoint="completions"),
                      top_logprobs=5)
    assert comp["prompt"] == "hi" and comp["logprobs"] == 5 and "messages" not in comp
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_config_validation():
    with pytest.raises(ValueError):
        LoadLevel("closed", 1.5, 1, 1)
    with pytest.raises(ValueError):
        LoadLevel("open", 0, 1, 1)
    with pytest.raises(ValueError):
        Arm("A", "localhost:8000")
    assert Arm("A", "http://h:1/v1/").server_root == "http://h:1"
    assert Arm("A", "http://h:1").api_root == "http://h:1/v1"
    assert LoadLevel("open", float("inf"), 1, 1).label == "rate=inf/s"


def _rec(i, arm, k, tokens, e2e, tpot):
    return RequestRecord(request_id=i, level="c=1", arm=arm, prompt_id=str(k), prompt_index=k,
                         ok=True, output_tokens=tokens, e2e_s=e2e, tpot_s=tpot)


def test_compare_speed_exact_ratio():
    recs = []
    for k in range(10):
        recs.append(_rec(2 * k, "A", k, 100 + k, 2.0 + 0.02 * k, 0.02))
        recs.append(_rec(2 * k + 1, "B", k, 100 + k, (2.0 + 0.02 * k) / 2, 0.01))
    recs.append(RequestRecord(99, "c=1", "B", "10", 10, error_type="timeout"))  # unpaired
    ab = compare_speed(recs, "A", "B", n_resamples=200)
    assert ab.pairs == 10
    assert ab.speedup_tps.point == pytest.approx(2.0)
    assert ab.speedup_tps.lo == pytest.approx(2.0) and ab.speedup_tps.hi == pytest.approx(2.0)
    assert ab.speedup_tpot.point == pytest.approx(2.0)
    assert ab.tpot_a_ms == pytest.approx(20.0)


def test_extra_body_null_removes_a_field():
    body = build_body(Arm("A", "http://h", "m"), Prompt(id="p", prompt="x"),
                      RequestConfig(extra_body={"stream_options": None, "seed": None}))
    assert "stream_options" not in body and "seed" not in body


@pytest.mark.parametrize("argv, expected", [
    (["--ab", "--extra-body-b", "{}"], 2),                        # A/B at temperature 0: on
    (["--ab", "--extra-body-b", "{}", "--temperature", "0.7"], None),  # sampling: no check
    (["--ab", "--extra-body-b", "{}", "--logprobs-in-run", "0"], None),  # off: re-ask instead
    (["--ab", "--extra-body-b", "{}", "--logprobs-in-run", "5"], 5),
    ([], None),                                                   # one arm: nothing to judge
])
def test_cli_in_run_logprobs_default(argv, expected):
    from mtpserve.loadtest.cli import build_parser, config_from_args
    parser = build_parser()
    args = parser.parse_args(["--base-url", "http://127.0.0.1:9", "--workload",
                              "synthetic:8,8", "--num-requests", "2", *argv])
    cfg = config_from_args(args, parser)
    assert cfg.request.top_logprobs == expected
    assert cfg.ab_schedule == "interleaved"
    args = parser.parse_args(["--base-url", "http://127.0.0.1:9", "--workload", "synthetic:8,8",
                              "--num-requests", "2", "--ab", "--extra-body-b", "{}",
                              "--ab-schedule", "separate"])
    assert config_from_args(args, parser).ab_schedule == "separate"
    ab = ["--base-url", "http://x", "--ab", "--extra-body-b", "{}"]
    cfg = config_from_args(parser.parse_args(ab + ["--ab-schedule", "alternating",
                                                   "--ab-blocks", "6"]), parser)
    assert (cfg.ab_schedule, cfg.ab_blocks) == ("alternating", 6)
    with pytest.raises(SystemExit):
        config_from_args(parser.parse_args(ab + ["--ab-blocks", "0"]), parser)


def test_config_rejects_bad_schedule_and_logprobs():
    with pytest.raises(ValueError, match="top_logprobs"):
        RequestConfig(top_logprobs=21)
    from mtpserve.loadtest.config import BenchmarkConfig
    with pytest.raises(ValueError, match="ab_schedule"):
        BenchmarkConfig(arms=(Arm("A", "http://h:1"), Arm("B", "http://h:1")),
                        request=RequestConfig(), levels=(LoadLevel("closed", 1, 1, 1),),
                        ab_schedule="mixed")


def test_cli_min_rounds_scales_requests_with_concurrency():
    from mtpserve.loadtest.cli import build_parser, config_from_args
    parser = build_parser()
    args = parser.parse_args(["--base-url", "http://127.0.0.1:9", "--workload", "synthetic:8,8",
                              "--num-requests", "8", "--min-rounds", "2",
                              "--concurrency", "1,4,8,32", "--request-rate", "2"])
    cfg = config_from_args(args, parser)
    assert [lv.num_requests for lv in cfg.levels] == [8, 8, 16, 64, 8]


def test_in_run_verdict_reads_the_first_differing_token_not_the_character():
    """"Given a tree" vs "Given an array": the texts differ at the space after "a" (the
    start of A's " tree"), but the runs diverged at " a" vs " an": the margins must be
    read there (a near tie), not at " tree" (a clear choice)."""
    from mtpserve.loadtest.ab import Mismatch, first_token_difference, judge_in_run

    def toks(*entries):
        return [TokenLogprob(t, top[0][1], list(top)) for t, top in entries]

    a = toks(("Given", [("Given", -0.1), ("Let", -3.0)]),
             (" a", [(" a", -0.70), (" an", -0.72)]),
             (" tree", [(" tree", -0.79), (" list", -1.44)]))
    b = toks(("Given", [("Given", -0.1), ("Let", -3.0)]),
             (" an", [(" an", -0.70), (" a", -0.71)]),
             (" array", [(" array", -0.2), (" list", -2.0)]))
    text_a, text_b = "".join(t.token for t in a), "".join(t.token for t in b)
    pos = first_difference(text_a, text_b)
    assert text_a[pos] == " " and token_at_char(a, pos) == 2  # the character lands on " tree"
    assert first_token_difference(a, b) == 1
    m = Mismatch("p", 0, pos, text_a, text_b)
    ra = RequestRecord(0, "c=1", "A", "p", 0, ok=True, text=text_a, token_logprobs=a)
    rb = RequestRecord(1, "c=1", "B", "p", 0, ok=True, text=text_b, token_logprobs=b)
    p = judge_in_run(ra, rb, m, near_tie_margin=0.5)
    assert (p.token_index, p.token) == (1, " a")
    assert p.margin == pytest.approx(0.02) and p.near_tie is True
    assert p.margin_b == pytest.approx(0.01)
    rb.token_logprobs = None  # B without logprobs: A's token at the character, as before
    assert judge_in_run(ra, rb, m, near_tie_margin=0.5).token == " tree"
