"""Tokenizers for training: `bytes`, `bpe:<vocab size>` or a local Hugging Face tokenizer folder.

- `bytes`: one token per UTF-8 byte (id = byte value) plus `<|endoftext|>` (id 256).
- `bpe:N`: byte-level BPE trained with the `tokenizers` library on the recipe's text sources (on the builtin corpus
  when it has only synthetic tasks). Digits are split one per token before BPE (as Llama does), so numbers such as
  pass keys are spelled digit by digit, the same way in every context. The trained tokenizer is cached by (vocab
  size, hash of the training text) and saved in the run dir.
- a folder: loaded with AutoTokenizer, local files only.
Every tokenizer is returned as a transformers tokenizer with an end-of-text token, which separates packed documents.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lctk.errors import UserError

END_OF_TEXT = "<|endoftext|>"
MIN_BPE_VOCAB = 300  # 256 bytes + specials + a few merges


def check_tokenizer_spec(spec: str) -> None:
    """Syntax only (a folder's existence is checked when it is loaded)."""
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not re.fullmatch(r"[0-9]+", size) or not MIN_BPE_VOCAB <= int(size) <= 1_000_000:
            raise ValueError(f"expected bpe:<vocab size> with a size from {MIN_BPE_VOCAB} to 1000000, got {spec!r}")
    elif not spec:
        raise ValueError("expected 'bytes', 'bpe:<vocab size>' or a local tokenizer folder")


def build_tokenizer(spec: str, training_text: Callable[[], Sequence[str]], cache_dir: Path):
    """The tokenizer a recipe names. `training_text` is called only when a BPE tokenizer must be trained."""
    from transformers import PreTrainedTokenizerFast

    if spec == "bytes":
        return PreTrainedTokenizerFast(tokenizer_object=_byte_tokenizer(), eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)
    if spec.startswith("bpe:"):
        return PreTrainedTokenizerFast(
            tokenizer_object=_trained_bpe(int(spec.removeprefix("bpe:")), training_text, cache_dir),
            eos_token=END_OF_TEXT,
            pad_token=END_OF_TEXT,
        )
    return load_local_tokenizer(spec)


def load_local_tokenizer(path: str, key: str = "tokenizer"):
    from transformers import AutoTokenizer

    from lctk.models.loading import TOKENIZER_FILES, remote_code_trusted

    if not Path(path).is_dir():
        raise UserError(f"{key}: tokenizer folder {path} not found (or use 'bytes' / 'bpe:<vocab size>')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=remote_code_trusted())
    except Exception as error:  # a damaged tokenizer.json fails inside the tokenizers library in its own ways
        vocabularies = [name for name in TOKENIZER_FILES if name != "tokenizer_config.json"]
        if not any((Path(path) / name).is_file() for name in vocabularies):  # transformers' message lists nothing
            raise UserError(f"{key}: no tokenizer in {path} (none of {', '.join(vocabularies)})") from None
        raise UserError(f"{key}: cannot load a tokenizer from {path} ({str(error).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": END_OF_TEXT})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would encode differently; keys the token store (lctk.data.store)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def encode_batch(tokenizer, documents: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(the token ids of all documents, one after another; each document's length), no special tokens added (the
    packer adds end-of-text). The tokenizers library encodes the batch on all cores; its `_fast` variant skips the
    character offsets, which nothing here reads."""
    encodings = tokenizer.backend_tokenizer.encode_batch_fast(documents, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
    return (np.concatenate(ids) if ids else np.zeros(0, dtype)), np.fromiter(map(len, ids), np.int64, len(ids))


def _byte_alphabet() -> list[str]:
    """The printable stand-in character of each byte value, as byte-level BPE writes bytes (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the others map to code points from 256 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: byte for byte, symbol in enumerate(_byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def _trained_bpe(vocab_size: int, training_text: Callable[[], Sequence[str]], cache_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    documents = training_text()
    digest = hashlib.sha256()
    for document in documents:
        digest.update(hashlib.sha256(document.encode()).digest())
    path = cache_dir / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.exists():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache file is retrained below
            pass
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{id(tokenizer)}")
    tokenizer.save(str(temporary))
    temporary.replace(path)
    return tokenizer
