"""Token attribution to SSE events and the latencies that follow."""
import pytest

from mtpserve.loadtest.timing import TimedEvent as E
from mtpserve.loadtest.timing import attribute_tokens, compute_latencies


def test_char_share_one_token_per_event():
    events = [E(0.0, ""), E(0.1, "ab"), E(0.2, "cd"), E(0.3, "")]
    assert attribute_tokens(events, 2) == ([0, 1, 1, 0], "char_share")


def test_char_share_spreads_extra_tokens_by_characters():
    # 9 tokens over 3 events: one each, the other 6 split by characters 1:2:3
    events = [E(0.1, "a"), E(0.2, "bb"), E(0.3, "ccc")]
    counts, src = attribute_tokens(events, 9)
    assert counts == [2, 3, 4] and sum(counts) == 9 and src == "char_share"


def test_char_share_largest_remainder_is_exact():
    events = [E(0.1, "aaa"), E(0.2, "aaa"), E(0.3, "aaa")]
    assert attribute_tokens(events, 10)[0] == [4, 3, 3]   # tie goes to the earlier event
    assert attribute_tokens(events, 2)[0] == [1, 1, 0]    # fewer tokens than events


def test_usage_stream_wins_over_chars():
    events = [E(0.0, "", usage_tokens=0), E(0.1, "abcdefgh", usage_tokens=1),
              E(0.2, "a", usage_tokens=4), E(0.3, "", usage_tokens=4)]
    assert attribute_tokens(events, 4) == ([0, 1, 3, 0], "usage_stream")


def test_final_usage_only_is_not_per_chunk_usage():
    events = [E(0.1, "ab"), E(0.2, "cd"), E(0.3, "", usage_tokens=2)]
    assert attribute_tokens(events, 2) == ([1, 1, 0], "char_share")


def test_logprobs_then_char_share_for_the_rest():
    events = [E(0.1, "abc", logprob_tokens=3), E(0.2, "d"), E(0.3, "efgh")]
    counts, src = attribute_tokens(events, 6)
    assert counts == [3, 1, 2] and src == "char_share+logprobs"


def test_no_usage_counts_events():
    assert attribute_tokens([E(0.1, "x"), E(0.2, ""), E(0.3, "yz")], None) == (
        [1, 0, 1], "events")


def test_latencies_spread_gap_over_event_tokens():
    events = [E(0.05, ""), E(0.10, "abc"), E(0.16, "def"), E(0.19, "g"), E(0.20, "")]
    lat = compute_latencies(events, [0, 3, 3, 1, 0])
    assert lat.ttft_s == pytest.approx(0.10)
    assert lat.itl_s == pytest.approx([0, 0, 0.02, 0.02, 0.02, 0.03])
    assert lat.attributed_tokens == 7
    assert lat.last_token_s == pytest.approx(0.19)
    assert sum(lat.itl_s) == pytest.approx(lat.last_token_s - lat.ttft_s)
    assert lat.tpot_s == pytest.approx(sum(lat.itl_s) / len(lat.itl_s))


def test_latencies_single_token_and_none():
    lat = compute_latencies([E(0.3, "x")], [1])
    assert lat.ttft_s == 0.3 and lat.tpot_s is None and lat.itl_s == []
    assert compute_latencies([E(0.3, "")], [0]).ttft_s is None
