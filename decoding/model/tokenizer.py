"""Tokenizer: encoding, chat templates and incremental (streaming) detokenization.

Built on the `tokenizers` library; the vocabulary comes from a GGUF file's metadata or from a
Hugging Face folder (`tokenizer.json`). `transformers` is only the test oracle: the GGUF
conversion below mirrors `transformers.integrations.gguf.gguf_tokenizer_mapping`, so that a
GGUF tokenizes exactly as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

# GGUF token types (gguf.TokenType); only these two become added tokens, as in transformers.
_CONTROL, _USER_DEFINED = 3, 4

# Token texts that end generation besides the declared EOS (llama.cpp's end-of-generation list):
# an instruct model may close its turn with any of them even when the file names only one.
_END_OF_GENERATION = (
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
_UNSUPPORTED_SPM_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
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


def _field_value(field: Any) -> Any:
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


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) and renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template, so templates render byte-identically.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")


def _check_messages(messages: Any) -> list[dict]:
    """Validated copies of chat messages, dropping None-valued keys as transformers does."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {role!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        checked.append({k: v for k, v in message.items() if v is not None})
    return checked


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens.

    Build with `from_gguf_fields`, `from_gguf` or `from_hf_folder`; the constructor takes an
    already configured `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        byte_level: bool = True,
    ) -> None:
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template = chat_template
        self._byte_level = byte_level
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a GGUF file's metadata (a few seconds: gguf parses the whole header) and build."""
        import gguf

        return cls.from_gguf_fields(gguf.GGUFReader(os.fspath(path)).fields)

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build from `gguf.GGUFReader(path).fields` (or a dict of the same keys to plain values)."""

        def get(key: str, default: Any = None) -> Any:
            return _field_value(fields[key]) if key in fields else default

        model = get("tokenizer.ggml.model")
        tokens: list[str] | None = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
        token_types: list[int] = get("tokenizer.ggml.token_type") or []
        merges: list[str] | None = get("tokenizer.ggml.merges")
        arch = get("general.architecture", "")

        if model == "gpt2":
            backend, vocab = _byte_level_backend(tokens, merges or [], get("tokenizer.ggml.pre"))
            add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        elif model == "llama" and arch not in _UNSUPPORTED_SPM_ARCHS:
            scores = get("tokenizer.ggml.scores")
            backend, vocab = _sentencepiece_backend(tokens, merges, scores, get("tokenizer.ggml.add_space_prefix", True))
            # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
            add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
        else:
            what = f"{model!r}" + (f" for architecture {arch!r}" if model == "llama" else "")
            raise ValueError(f"unsupported GGUF tokenizer model {what}; supported: 'gpt2' (byte-level BPE), 'llama'")
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False))

        # Control tokens (<|im_start|>, ...) must stay whole and be skippable on decode. In a byte-level
        # vocabulary a "control" token spelled outside the byte alphabet is a llama.cpp mislabel; skip it.
        alphabet = set(_bytes_to_unicode().values()) if model == "gpt2" else None
        named = [get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")]
        specials = [
            AddedToken(tok, normalized=False, special=True)
            for tok, kind in zip(tokens, token_types)
            if kind == _CONTROL and (alphabet is None or set(tok) <= alphabet)
        ]
        named_texts = {tokens[i] for i in named if i is not None and 0 <= i < len(tokens)}
        have = {str(t) for t in specials}
        specials += [AddedToken(t, normalized=False, special=True) for t in named_texts if t not in have and t in vocab]
        if specials:
            backend.add_special_tokens(specials)
        user = [AddedToken(tok, normalized=False, special=False)
                for tok, kind in zip(tokens, token_types) if kind == _USER_DEFINED and tok in vocab]
        if user:
            backend.add_tokens(user)

        bos_id, eos_id = named[0], named[1]
        _set_bos_eos_processor(backend, bos_id if add_bos else None, eos_id if add_eos else None, tokens)
        eos_ids = [eos_id] if eos_id is not None else []
        eos_ids += [i for i in (get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id")) if i is not None]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids + _end_of_generation_ids(backend),
            chat_template=get("tokenizer.chat_template"),
            byte_level=model == "gpt2",
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model folder: tokenizer.json, tokenizer_config.json,
        chat_template.jinja and generation_config.json (each optional but the first)."""
        path = os.fspath(path)
        backend = _Backend.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        generation = _read_json(os.path.join(path, "generation_config.json"))

        bos_id = backend.token_to_id(_token_content(config.get("bos_token")) or "")
        eos_id = backend.token_to_id(_token_content(config.get("eos_token")) or "")
        # As transformers: an explicit add_bos/add_eos_token (or no post-processor) rebuilds the post-processor.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            _set_bos_eos_processor(
                backend,
                bos_id if config.get("add_bos_token") else None,
                eos_id if config.get("add_eos_token") else None,
                None,
            )

        gen_eos = generation.get("eos_token_id")
        eos_ids = [eos_id] if eos_id is not None else []
        eos_ids += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []

        template = config.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        decoder_state = json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else {}
        return cls(
            backend,
            bos_token_id=bos_id if bos_id is not None else generation.get("bos_token_id"),
            eos_token_ids=eos_ids + _end_of_generation_ids(backend),
            chat_template=template,
            byte_level='"ByteLevel"' in json.dumps(decoder_state),
        )

    # ----------------------------------------------------------------- properties
    @property
    def backend(self) -> _Backend:
        """The underlying `tokenizers.Tokenizer` (for batch encoding or inspection)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: the declared EOS first, then end-of-turn tokens in the vocab."""
        return self._eos_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of an id (byte-level vocabularies spell bytes as printable chars)."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (for logprobs' `bytes`); may be part of a UTF-8 character."""
        tok = self._backend.id_to_token(int(token_id))
        if tok is None:
            raise ValueError(f"token id {token_id} is out of range for a vocabulary of {self.vocab_size}")
        if self._byte_level:
            try:
                return bytes(self._byte_decoder[c] for c in tok)
            except KeyError:  # an added token spelled outside the byte alphabet: its text as is
                return tok.encode("utf-8")
        if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):  # sentencepiece byte fallback
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode("utf-8")

    # ----------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added only when the model asks for them."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """Render a conversation with the model's chat template. Any problem -> ValueError."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain completion prompt instead")
        checked = _check_messages(messages)
        names = {"bos_token": self._bos_token_id, "eos_token": self._eos_token_ids[0] if self._eos_token_ids else None}
        specials = {k: self.id_to_token(v) for k, v in names.items() if v is not None}
        try:
            return _compile_template(self.chat_template).render(
                messages=checked,
                tools=list(tools) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **specials,
            )
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...), syntax, undefined, security
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
        except (TypeError, KeyError, IndexError, AttributeError) as exc:  # e.g. content of the wrong type
            raise ValueError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str | None) -> tuple[_Backend, dict[str, int]]:
    # Tokens not spelled in the byte alphabet are respelled byte-wise, as transformers does.
    table = _bytes_to_unicode()
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


def _sentencepiece_backend(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None, add_space_prefix: bool
) -> tuple[_Backend, dict[str, int]]:
    # Llama/Mistral sentencepiece as BPE with byte fallback, like transformers' LlamaTokenizer.
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
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


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a piece into two known pieces,
    best piece score first (transformers' `generate_merges` with scores)."""
    found = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        found.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def _set_bos_eos_processor(backend: _Backend, bos_id: int | None, eos_id: int | None, tokens: list[str] | None) -> None:
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


def _end_of_generation_ids(backend: _Backend) -> list[int]:
    specials = {tok.content: i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    return [specials[t] for t in _END_OF_GENERATION if t in specials]


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class IncrementalDetokenizer:
    """Streams the text of generated tokens, never splitting a multi-byte UTF-8 character.

    Each `add()` decodes only a short window: a few already-emitted tokens as context (so
    context-sensitive decoders, e.g. sentencepiece's leading-space strip, behave as in a full
    decode) plus the pending ones. Text whose window ends in U+FFFD (an incomplete character)
    is held back; `flush()` emits what is left, with replacement characters only then.

    Without `prompt_ids`, the concatenated output equals `tokenizer.decode(output_ids)` whenever
    that decode is valid text. With `prompt_ids`, the prompt's tail is the initial context, so
    the text is what the output adds after the prompt (a sentencepiece leading space is kept).
    """

    _CONTEXT = 6  # tokens of already-emitted context kept in the window

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._read = len(self._window)  # window[:read] is context already emitted, window[read:] pending

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (possibly "")."""
        if not token_ids:
            return ""
        self._window.extend(int(i) for i in token_ids)
        text, complete = self._pending_text()
        if not complete:
            return ""
        self._window = self._window[max(0, len(self._window) - self._CONTEXT):]
        self._read = len(self._window)
        return text

    def flush(self) -> str:
        """Emit whatever is held back (end of generation); incomplete bytes become U+FFFD."""
        text, _ = self._pending_text()
        self._window = self._window[max(0, len(self._window) - self._CONTEXT):]
        self._read = len(self._window)
        return text

    def _pending_text(self) -> tuple[str, bool]:
        if self._read == len(self._window):
            return "", True
        prefix = self._tok.decode(self._window[: self._read], self._skip) if self._read else ""
        full = self._tok.decode(self._window, self._skip)
        return full[len(prefix):], not full.endswith("\ufffd")
