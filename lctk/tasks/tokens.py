"""Small helpers over Hugging Face tokenizers: a stable fingerprint (for sample keys and caches), the special tokens
the tokenizer adds around a text, and batch encoding with character offsets where the tokenizer provides them."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass

import numpy as np

from lctk.errors import UserError

_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_specials: dict[str, tuple[list[int], list[int]]] = {}


def fingerprint(tokenizer) -> str:
    """A short hash of everything that decides how the tokenizer encodes text (vocabulary, merges, normalisers,
    specials). Equal fingerprints mean equal token ids for every text."""
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        description = backend.to_str()
    else:  # Python tokenizers: the vocabulary and the specials decide the encoding
        description = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    digest = hashlib.sha256(f"{type(tokenizer).__name__}\n{specials}\n{description}".encode()).hexdigest()[:16]
    try:
        _fingerprints[tokenizer] = digest
    except TypeError:
        pass
    return digest


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # int64 token ids
    offsets: np.ndarray | None  # (n, 2) int64 character spans, None when the tokenizer cannot give them


def has_offsets(tokenizer) -> bool:
    return bool(getattr(tokenizer, "is_fast", False))


def encode_batch(tokenizer, texts: list[str], with_offsets: bool) -> list[Encoded]:
    """Token ids of each text without special tokens (and their character offsets when asked and available)."""
    if not texts:
        return []
    with_offsets = with_offsets and has_offsets(tokenizer)
    out = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=with_offsets)
    offsets = out["offset_mapping"] if with_offsets else [None] * len(texts)
    return [
        Encoded(np.asarray(ids, dtype=np.int64), None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2))
        for ids, spans in zip(out["input_ids"], offsets, strict=True)
    ]


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when add_special_tokens=True (e.g. [BOS], [])."""
    key = fingerprint(tokenizer)
    if key not in _specials:
        probe = "special tokens probe"
        plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        for at in range(len(full) - len(plain) + 1):
            if full[at : at + len(plain)] == plain:
                _specials[key] = (full[:at], full[at + len(plain) :])
                break
        else:
            raise ValueError("the tokenizer's special tokens wrap a text in a way lctk cannot split")
    return _specials[key]



CHAT_MODES = ("auto", "on", "off")
_MARK = "\x00LCTK-PROMPT\x00"


def chat_wrap(tokenizer, mode: str) -> tuple[str, str]:
    """(text before, text after) the user's message in the tokenizer's chat template, generation prompt included, as
    RULER wraps its prompts for instruct models; ("", "") for mode "off", or "auto" without a chat template."""
    if mode not in CHAT_MODES:
        raise UserError(f"--chat-template: use one of {', '.join(CHAT_MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not getattr(tokenizer, "chat_template", None)):
        return "", ""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template on: the tokenizer has no chat template (use auto or off)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True)
    before, _, after = text.partition(_MARK)
    return before, after
