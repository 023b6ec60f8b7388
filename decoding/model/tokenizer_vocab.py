"""Vocabulary loading for the Tokenizer (tokenizer.py): a GGUF file's tokenizer metadata
turned into a configured `tokenizers` backend (byte-level BPE or sentencepiece-as-BPE),
the BOS/EOS post-processor, end-of-generation ids, and the small readers a Hugging Face
folder needs.

Kept apart from the Tokenizer class because it is the bulk of the code and changes for
different reasons: it mirrors `transformers.integrations.gguf.gguf_tokenizer_mapping`
(pre-tokenizer regexes, merges from scores) so that a GGUF tokenizes exactly as
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from tokenizers import Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

# GGUF token types (gguf.TokenType); only these two become added tokens, as in transformers.
CONTROL, USER_DEFINED = 3, 4

# Token texts that end generation besides the declared EOS (llama.cpp's end-of-generation list):
# an instruct model may close its turn with any of them even when the file names only one.
END_OF_GENERATION = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
    "<end_of_turn>", "<EOT>", "_<EOT>", "<|return|>", "<|call|>", "<end_of_utterance>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)

# Split regexes by `tokenizer.ggml.pre` (llama.cpp's pre-tokenizer names), copied from
# transformers. A name not listed (gpt2, smollm, ...) keeps GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}

# Architectures whose sentencepiece files need bespoke fixes in transformers; refused, not guessed.
UNSUPPORTED_SPM_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table that byte-level vocabularies are spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def field_value(field: Any) -> Any:
    """A `gguf.ReaderField` as a Python value (str, int, float, bool or list); plain values pass through.

    Written against `parts`/`data`/`types` rather than `ReaderField.contents()`, which older gguf lacks.
    """
    if not hasattr(field, "parts") or not hasattr(field, "types"):
        return field
    string, array = 8, 9
    if not field.types:
        return None
    if field.types[0] == array:
        if field.types[-1] == string:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if field.types[0] == string:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def byte_level_backend(tokens: list[str], merges: list[str], pre: str | None) -> tuple[_Backend, dict[str, int]]:
    # Tokens not spelled in the byte alphabet are respelled byte-wise, as transformers does.
    table = bytes_to_unicode()
    alphabet = set(table.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(table[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ")) for m in merges]
    backend = _Backend(BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="", fuse_unk=False))
    split = _PRE_SPLITS.get(pre or "")
    if split is None:  # gpt2, smollm, starcoder, ...: GPT-2's own regex inside ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def sentencepiece_backend(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None, add_space_prefix: bool
) -> tuple[_Backend, dict[str, int]]:
    # Llama/Mistral sentencepiece as BPE with byte fallback, like transformers' LlamaTokenizer.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = merges_from_scores(vocab, dict(zip(tokens, scores)))
    else:
        raise ValueError("sentencepiece GGUF has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    backend = _Backend(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    # transformers always prepends; we also honour a file that says add_space_prefix = false (as llama.cpp).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a piece into two known pieces,
    best piece score first (transformers' `generate_merges` with scores)."""
    found = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def set_bos_eos_processor(backend: _Backend, bos_id: int | None, eos_id: int | None, tokens: list[str] | None) -> None:
    """Post-processor that adds BOS / EOS around a single sequence when the model asks for them."""

    def text(i: int) -> str:
        return tokens[i] if tokens is not None else backend.id_to_token(i)

    single, special = ["$A:0"], []
    if bos_id is not None:
        single.insert(0, f"{text(bos_id)}:0")
        special.append((text(bos_id), bos_id))
    if eos_id is not None:
        single.append(f"{text(eos_id)}:0")
        special.append((text(eos_id), eos_id))
    pair = single + [s.replace("$A:0", "$B:1").replace(":0", ":1") for s in single]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                           special_tokens=special)


def end_of_generation_ids(backend: _Backend) -> list[int]:
    specials = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return [specials[t] for t in END_OF_GENERATION if t in specials]


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
