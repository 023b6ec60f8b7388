"""The real server with the default model, driven by the official `openai` client and httpx.

Greedy (temperature 0) outputs are compared exactly: streamed vs not, and vs the engine
runner used directly. max_tokens stays small so the suite is quick on 2 CPU cores.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from mtpserve.decoding.config import SamplingParams
from server_helpers import run_direct, sse_events

PROMPT = "The three primary colors are"
CHAT = [{"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a fruit that is yellow."}]


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=server_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def aclient_factory(server_url):
    return lambda: openai.AsyncOpenAI(base_url=server_url + "/v1", api_key="unused",
                                      max_retries=0)


def test_models_and_health(client, server_url, model_name):
    assert httpx.get(server_url + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]


def test_completion_greedy_equal_streamed_plain_and_direct(client, model_name, shared_runner,
                                                           server):
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=16,
                                      temperature=0)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 16 and plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    spec = plain.model_extra["metrics"]["speculative_decoding"]
    assert spec["acceptance_rule"] in ("greedy", "none")

    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=16,
                                            temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    ids = server.state.engine.tokenizer.encode(PROMPT)
    text, tokens, last = run_direct(shared_runner, ids, SamplingParams(max_tokens=16,
                                                                      temperature=0))
    assert text == choice.text and len(tokens) == plain.usage.completion_tokens
    assert last.finish_reason == choice.finish_reason


def test_chat_greedy_equal_streamed_plain_and_direct(client, model_name, shared_runner, server):
    plain = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=16,
                                           temperature=0)
    msg = plain.choices[0].message
    assert plain.object == "chat.completion" and msg.role == "assistant" and msg.content

    stream = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices
                   and c.choices[0].delta.content) == msg.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == \
        plain.choices[0].finish_reason
    # the usage chunk: last, no choices, usage equal to the plain response's, metrics on it
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage
    spec = usage_chunk.model_extra["metrics"]["speculative_decoding"]
    assert spec["num_steps"] >= 1
    # several tokens accepted in one step travel as one event
    assert len(content) <= plain.usage.completion_tokens
    if spec["num_accepted_draft_tokens"] > 0:
        assert len(content) < plain.usage.completion_tokens

    ids = server.state.engine.tokenizer.encode_chat(CHAT)
    text, _, _ = run_direct(shared_runner, ids, SamplingParams(max_tokens=16, temperature=0))
    assert text == msg.content


def test_async_client_concurrent_requests(aclient_factory, client, model_name):
    prompts = ["One, two, three,", "Roses are red,", "The quick brown fox"]
    expected = [client.completions.create(model=model_name, prompt=p, max_tokens=8,
                                          temperature=0).choices[0].text for p in prompts]

    async def main():
        async with aclient_factory() as ac:
            async def one(p):
                r = await ac.completions.create(model=model_name, prompt=p, max_tokens=8,
                                                temperature=0)
                return r.choices[0].text

            async def chat():
                s = await ac.chat.completions.create(model=model_name, messages=CHAT,
                                                     max_tokens=8, temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in s
                                if c.choices])
            return await asyncio.gather(*(one(p) for p in prompts), chat())

    got = asyncio.run(main())
    # batch composition does not change greedy output
    assert got[:3] == expected
    assert got[3] == client.chat.completions.create(model=model_name, messages=CHAT,
                                                    max_tokens=8,
                                                    temperature=0).choices[0].message.content


def test_n_choices_and_seed(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8,
                                  temperature=0.8, n=3, seed=1234)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    again = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8,
                                      temperature=0.8, n=3, seed=1234)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.usage.completion_tokens == again.usage.completion_tokens
    assert r.usage.prompt_tokens == again.usage.prompt_tokens  # counted once per prompt
    # the same seed, streamed, gives the same text
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=8,
                                            temperature=0.8, n=3, seed=1234, stream=True))
    texts = {i: "" for i in range(3)}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert [texts[i] for i in range(3)] == [c.text for c in r.choices]
    # chat with n
    chat = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6,
                                          temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == \
        chat.choices[1].message.content


def test_multiple_prompts(client, model_name):
    r = client.completions.create(model=model_name, prompt=["Hello", "Goodbye"], max_tokens=4,
                                  temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    one = client.completions.create(model=model_name, prompt="Goodbye", max_tokens=4,
                                    temperature=0)
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[2] == by_index[3] == one.choices[0].text


def test_stop_strings(client, model_name):
    base = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=16,
                                     temperature=0).choices[0].text
    words = base.split()
    assert len(words) >= 3, base
    stop = " " + words[2]
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=16,
                                  temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[:base.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_echo(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0,
                                  echo=True)
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4,
                                      temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    only = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=0, echo=True)
    assert only.choices[0].text == PROMPT and only.usage.completion_tokens == 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == r.choices[0].text


def test_token_id_prompts(client, model_name, server):
    ids = server.state.engine.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=model_name, prompt=ids, max_tokens=6,
                                       temperature=0)
    by_text = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_completion_logprobs_shape(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == \
        len(lp.text_offset) == n
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and tok in top and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(value, abs=1e-4)  # greedy: chosen is top
    streamed = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6,
                                              temperature=0, logprobs=3, stream=True))
    s_tokens = [t for c in streamed if c.choices[0].logprobs
                for t in c.choices[0].logprobs.tokens]
    s_offsets = [o for c in streamed if c.choices[0].logprobs
                 for o in c.choices[0].logprobs.text_offset]
    assert s_tokens == lp.tokens and s_offsets == lp.text_offset


def test_chat_logprobs_shape(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert isinstance(item.token, str) and item.logprob <= 0
        assert isinstance(item.bytes, list) and all(0 <= b < 256 for b in item.bytes)
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].token == item.token  # greedy
    joined = b"".join(bytes(i.bytes) for i in content).decode("utf-8", errors="replace")
    assert joined.strip() == r.choices[0].message.content.strip()
    plain = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=6,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


def test_speculation_extension(client, model_name):
    on = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12,
                                   temperature=0)
    off = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12,
                                    temperature=0, extra_body={"speculation": {"enabled": False}})
    assert on.choices[0].text == off.choices[0].text
    spec_off = off.model_extra["metrics"]["speculative_decoding"]
    assert spec_off["num_spec_steps"] == 0 and spec_off["acceptance_rule"] == "none"
    sampled = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=8, temperature=0.7, seed=3,
        extra_body={"speculation": {"acceptance": "rejection"}, "top_k": 20})
    rule = sampled.model_extra["metrics"]["speculative_decoding"]["acceptance_rule"]
    assert rule in ("rejection", "none")


def test_ignore_eos_runs_to_max_tokens(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=24,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"


def test_raw_sse_framing(server_url, model_name):
    body = {"model": model_name, "messages": CHAT, "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server_url + "/v1/chat/completions", json=body,
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and "speculative_decoding" in usage["metrics"]
    assert all("metrics" not in e for e in events[:-2])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ids = {e["id"] for e in events[:-1]}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
