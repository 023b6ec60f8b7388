"""Tokenizer: encoding, decoding, chat templates and stop tokens for one model.

Built on the `tokenizers` library; the vocabulary comes from a GGUF file's metadata or from a
Hugging Face folder (`tokenizer.json`). `transformers` is only the test oracle: the GGUF
conversion (tokenizer_vocab.py) mirrors `transformers.integrations.gguf.gguf_tokenizer_mapping`,
so that a GGUF tokenizes exactly as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` does.
Chat templates are rendered by chat_template.py; streaming detokenization is
detokenizer.py's `IncrementalDetokenizer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from .chat_template import check_messages, render_chat_template
from .tokenizer_vocab import (
    CONTROL,
    UNSUPPORTED_SPM_ARCHS,
    USER_DEFINED,
    byte_level_backend,
    bytes_to_unicode,
    end_of_generation_ids,
    field_value,
    read_json,
    sentencepiece_backend,
    set_bos_eos_processor,
    token_content,
)


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
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
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
            return field_value(fields[key]) if key in fields else default

        model = get("tokenizer.ggml.model")
        tokens: list[str] | None = get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens: it carries no tokenizer")
        token_types: list[int] = get("tokenizer.ggml.token_type") or []
        merges: list[str] | None = get("tokenizer.ggml.merges")
        arch = get("general.architecture", "")

        if model == "gpt2":
            backend, vocab = byte_level_backend(tokens, merges or [], get("tokenizer.ggml.pre"))
            add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        elif model == "llama" and arch not in UNSUPPORTED_SPM_ARCHS:
            scores = get("tokenizer.ggml.scores")
            backend, vocab = sentencepiece_backend(tokens, merges, scores, get("tokenizer.ggml.add_space_prefix", True))
            # llama.cpp adds BOS to sentencepiece vocabularies that do not say otherwise.
            add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
        else:
            what = f"{model!r}" + (f" for architecture {arch!r}" if model == "llama" else "")
            raise ValueError(f"unsupported GGUF tokenizer model {what}; supported: 'gpt2' (byte-level BPE), 'llama'")
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False))

        # Control tokens (<|im_start|>, ...) must stay whole and be skippable on decode. In a byte-level
        # vocabulary a "control" token spelled outside the byte alphabet is a llama.cpp mislabel; skip it.
        alphabet = set(bytes_to_unicode().values()) if model == "gpt2" else None
        named = [get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")]
        specials = [
            AddedToken(tok, normalized=False, special=True)
            for tok, kind in zip(tokens, token_types)
            if kind == CONTROL and (alphabet is None or set(tok) <= alphabet)
        ]
        named_texts = {tokens[i] for i in named if i is not None and 0 <= i < len(tokens)}
        have = {str(t) for t in specials}
        specials += [AddedToken(t, normalized=False, special=True) for t in named_texts if t not in have and t in vocab]
        if specials:
            backend.add_special_tokens(specials)
        user = [AddedToken(tok, normalized=False, special=False)
                for tok, kind in zip(tokens, token_types) if kind == USER_DEFINED and tok in vocab]
        if user:
            backend.add_tokens(user)

        bos_id, eos_id = named[0], named[1]
        set_bos_eos_processor(backend, bos_id if add_bos else None, eos_id if add_eos else None, tokens)
        eos_ids = [eos_id] if eos_id is not None else []
        eos_ids += [i for i in (get("tokenizer.ggml.eot_token_id"), get("tokenizer.ggml.eom_token_id")) if i is not None]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids + end_of_generation_ids(backend),
            chat_template=get("tokenizer.chat_template"),
            byte_level=model == "gpt2",
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a Hugging Face model folder: tokenizer.json, tokenizer_config.json,
        chat_template.jinja and generation_config.json (each optional but the first)."""
        path = os.fspath(path)
        backend = _Backend.from_file(os.path.join(path, "tokenizer.json"))
        config = read_json(os.path.join(path, "tokenizer_config.json"))
        generation = read_json(os.path.join(path, "generation_config.json"))

        bos_id = backend.token_to_id(token_content(config.get("bos_token")) or "")
        eos_id = backend.token_to_id(token_content(config.get("eos_token")) or "")
        # As transformers: an explicit add_bos/add_eos_token (or no post-processor) rebuilds the post-processor.
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            set_bos_eos_processor(
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
            eos_token_ids=eos_ids + end_of_generation_ids(backend),
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
        checked = check_messages(messages)
        names = {"bos_token": self._bos_token_id, "eos_token": self._eos_token_ids[0] if self._eos_token_ids else None}
        specials = {k: self.id_to_token(v) for k, v in names.items() if v is not None}
        return render_chat_template(self.chat_template, checked, tools, add_generation_prompt, specials)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # The template writes any BOS itself, so no special tokens are added (as transformers does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
