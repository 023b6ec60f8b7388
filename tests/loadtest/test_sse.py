"""SSE decoding and stream-chunk interpretation."""
from mtpserve.loadtest.sse import SSEDecoder, parse_chunk


def feed(lines):
    dec = SSEDecoder()
    out = []
    for line in lines:
        out += dec.feed_line(line)
    return out + dec.close()


def test_decoder_standard_events():
    lines = ['data: {"a": 1}', "", ": keep-alive comment", "", "event: message",
             'data: {"b": 2}', "", "data: [DONE]", ""]
    assert feed(lines) == ['{"a": 1}', '{"b": 2}', "[DONE]"]


def test_decoder_multiline_data_and_no_space():
    assert feed(['data:{"a":', "data: 1}", ""]) == ['{"a":\n1}']


def test_decoder_tolerates_missing_blank_lines_and_crlf():
    assert feed(['data: {"a": 1}\r', 'data: {"b": 2}', "data: [DONE]"]) == [
        '{"a": 1}', '{"b": 2}', "[DONE]"]


def test_chat_chunk_text_finish_usage_metrics():
    c = parse_chunk({"choices": [{"index": 0, "delta": {"content": "hi"},
                                  "finish_reason": None}]})
    assert c.text == "hi" and c.finish_reason is None and c.completion_tokens is None
    spec = {"mean_acceptance_length": 2.5}
    final = parse_chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9},
                         "metrics": {"speculative_decoding": spec}})
    assert final.text == "" and final.completion_tokens == 9 and final.spec == spec
    nested = parse_chunk({"choices": [], "usage": {"completion_tokens": 1,
                                                   "metrics": {"speculative_decoding": spec}}})
    assert nested.spec == spec


def test_completion_chunk_and_logprobs():
    c = parse_chunk({"choices": [{"text": "ab", "finish_reason": "length", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"a": -0.1, "c": -1.0}, {"x": -0.05, "b": -0.2}]}}]})
    assert c.text == "ab" and c.finish_reason == "length" and c.logprob_tokens == 2
    assert c.logprobs[1].top == [("x", -0.05), ("b", -0.2)]  # sorted best first


def test_chat_logprobs():
    c = parse_chunk({"choices": [{"delta": {"content": "ab"}, "logprobs": {"content": [
        {"token": "a", "logprob": -0.3, "top_logprobs": [{"token": "z", "logprob": -1.0},
                                                          {"token": "a", "logprob": -0.3}]},
        {"token": "b", "logprob": -0.1, "top_logprobs": []}]}}]})
    assert c.logprob_tokens == 2
    assert c.logprobs[0].top == [("a", -0.3), ("z", -1.0)]


def test_error_event():
    assert parse_chunk({"error": {"message": "boom", "type": "x"}}).error == "boom"
    assert parse_chunk({"error": "plain"}).error == "plain"
    assert parse_chunk(["not", "a", "dict"]).error is not None


def test_error_event_shapes_from_other_servers():
    # llama.cpp server: an `error:` field line; SSE `event: error`; older vLLM ErrorResponse
    assert feed(['error: {"code": 500, "message": "oops"}', ""]) == [
        '{"error": {"code": 500, "message": "oops"}}']
    assert feed(["event: error", "data: overloaded", "", 'data: {"a": 1}', ""]) == [
        '{"error": "overloaded"}', '{"a": 1}']
    assert parse_chunk({"object": "error", "message": "bad", "code": 400}).error == "bad"
