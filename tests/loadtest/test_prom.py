"""Prometheus parsing and the speculative-decoding math on counter deltas."""
import pytest

from mtpserve.loadtest.prom import (counter_deltas, parse_text, parse_text_fallback,
                                    spec_decode_stats)


def exposition(drafts, draft_tokens, accepted, acc_pos, drafts_pos):
    lines = ["# HELP mtpserve_spec_decode_num_drafts steps",
             "# TYPE mtpserve_spec_decode_num_drafts counter",
             f"mtpserve_spec_decode_num_drafts_total {drafts}",
             "mtpserve_spec_decode_num_drafts_created 1.7e+09",
             "# TYPE mtpserve_spec_decode_num_draft_tokens counter",
             f"mtpserve_spec_decode_num_draft_tokens_total {draft_tokens}",
             "# TYPE mtpserve_spec_decode_num_accepted_tokens counter",
             f"mtpserve_spec_decode_num_accepted_tokens_total {accepted}",
             "# TYPE mtpserve_spec_decode_num_accepted_tokens_per_pos counter"]
    lines += [f'mtpserve_spec_decode_num_accepted_tokens_per_pos_total{{position="{p}"}} {v}'
              for p, v in enumerate(acc_pos)]
    lines += ["# TYPE mtpserve_spec_decode_num_drafts_per_pos counter"]
    lines += [f'mtpserve_spec_decode_num_drafts_per_pos_total{{position="{p}"}} {v}'
              for p, v in enumerate(drafts_pos)]
    lines += ['http_requests_total{handler="/v1/chat/completions",method="POST"} 12',
              'weird_label{path="a\\"b\\\\c"} 1']
    return "\n".join(lines) + "\n"


def test_parsers_agree():
    text = exposition(10, 30, 17, [9, 6, 2], [10, 10, 10])
    fast, small = parse_text(text), parse_text_fallback(text)
    assert fast == small
    assert small[("weird_label", (("path", 'a"b\\c'),))] == 1.0


def test_mtpserve_deltas_give_rates():
    before = parse_text(exposition(10, 30, 17, [9, 6, 2], [10, 10, 10]))
    after = parse_text(exposition(30, 90, 57, [29, 20, 8], [30, 28, 26]))
    stats = spec_decode_stats(counter_deltas(before, after))
    s = stats["mtpserve"]
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (20, 60, 40)
    assert s.acceptance_rate == pytest.approx(40 / 60)
    assert s.mean_accepted_per_step == pytest.approx(2.0)
    assert s.mean_acceptance_length == pytest.approx(3.0)
    assert s.acceptance_per_position == pytest.approx([20 / 20, 14 / 18, 6 / 16])
    assert "vllm" not in stats


def test_vllm_names_with_labels_and_bare_counters():
    def text(d, t, a, pos):
        out = ['vllm:spec_decode_num_drafts{engine="0",model_name="m"} ' + str(d),
               'vllm:spec_decode_num_draft_tokens{engine="0",model_name="m"} ' + str(t),
               'vllm:spec_decode_num_accepted_tokens{engine="0",model_name="m"} ' + str(a)]
        for engine in ("0", "1"):  # two engines: summed per position
            out += [f'vllm:spec_decode_num_accepted_tokens_per_pos{{engine="{engine}",'
                    f'model_name="m",position="{p}"}} {v}' for p, v in enumerate(pos)]
        return "\n".join(out) + "\n"

    d = counter_deltas(parse_text(text(0, 0, 0, [0, 0])), parse_text(text(8, 16, 10, [3, 2])))
    s = spec_decode_stats(d)["vllm"]
    assert s.acceptance_rate == pytest.approx(10 / 16)
    assert s.mean_acceptance_length == pytest.approx(1 + 10 / 8)
    assert s.acceptance_per_position == pytest.approx([6 / 8, 4 / 8])


def test_counter_reset_and_new_series():
    before = {("a_total", ()): 50.0}
    after = {("a_total", ()): 7.0, ("b_total", ()): 3.0}
    assert counter_deltas(before, after) == {("a_total", ()): 7.0, ("b_total", ()): 3.0}


def test_no_spec_metrics_and_no_drafts():
    assert spec_decode_stats(parse_text("process_cpu_seconds_total 3\n")) == {}
    zero = parse_text(exposition(5, 15, 5, [5], [5]))
    s = spec_decode_stats(counter_deltas(zero, zero))["mtpserve"]
    assert s.acceptance_rate is None and s.mean_acceptance_length is None
    assert s.acceptance_per_position == [None]
