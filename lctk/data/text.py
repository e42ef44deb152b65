"""Text sources: the builtin corpus, local files (txt, jsonl, parquet, or a folder of them) and hub datasets, read as
documents and tokenised once into an on-disk cache.

A .txt file is one document; jsonl and parquet rows are documents (their `field` column), read through `datasets`.
The cache holds, per (source, tokenizer), the concatenated token ids and document offsets as .npy files, keyed by the
source's identity (file size and mtime, or dataset name/config/split) and the tokenizer's fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from lctk.data.tokenizer import encode_documents, fingerprint
from lctk.errors import UserError

FORMAT_VERSION = 1
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def read_documents(source, key: str) -> list[str]:
    """The documents of a `text:` or `hub:` source (`key` names it in errors, e.g. data.sources.0)."""
    if source.hub is not None:
        documents = _hub_documents(source, key)
    elif source.text == "builtin":
        from lctk.data.corpus import builtin_documents

        documents = list(builtin_documents())
    else:
        documents = []
        for path in _local_files(Path(source.text), f"{key}.text"):
            documents.extend(_file_documents(path, source.field, f"{key}.field"))
    if source.max_documents is not None:
        documents = documents[: source.max_documents]
    if not documents:
        raise UserError(f"{key}: no text found in {source.label}")
    return documents


def tokenized_documents(source, key: str, tokenizer, cache_dir: Path) -> list[np.ndarray]:
    """Token ids per document, from the cache when this source and tokenizer were seen before."""
    path = cache_dir / "tokenized" / f"{_identity(source, key)}-{fingerprint(tokenizer)}"
    tokens_file, offsets_file = path.with_suffix(".tokens.npy"), path.with_suffix(".offsets.npy")
    if tokens_file.exists() and offsets_file.exists():
        try:
            tokens, offsets = np.load(tokens_file), np.load(offsets_file)
            return np.split(tokens, offsets[1:-1])
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt
    encoded = encode_documents(tokenizer, read_documents(source, key))
    offsets = np.cumsum([0, *map(len, encoded)])
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    tokens = np.fromiter((t for doc in encoded for t in doc), dtype=dtype, count=int(offsets[-1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    for file, array in ((tokens_file, tokens), (offsets_file, offsets)):
        temporary = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as handle:
            np.save(handle, array)
        temporary.replace(file)
    return np.split(tokens, offsets[1:-1])


def _identity(source, key: str) -> str:
    if source.hub is not None:
        described = [source.hub, source.config, source.split, source.field]
    elif source.text == "builtin":
        from lctk.data.corpus import builtin_documents

        described = ["builtin", hashlib.sha256("\n\n".join(builtin_documents()).encode()).hexdigest()]
    else:
        files = _local_files(Path(source.text), f"{key}.text")
        described = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files] + [source.field]
    described += [source.max_documents, FORMAT_VERSION]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _local_files(path: Path, key: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise UserError(f"{key}: folder {path} holds no {', '.join(FILE_SUFFIXES)} files")
        return files
    if not path.exists():
        raise UserError(f"{key}: file {path} not found (use 'builtin' for the builtin corpus)")
    if path.suffix not in FILE_SUFFIXES:
        raise UserError(f"{key}: {path} is not a {', '.join(FILE_SUFFIXES)} file")
    return [path]


def _file_documents(path: Path, field: str, key: str) -> list[str]:
    if path.suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise UserError(f"{key.rsplit('.', 1)[0]}.text: {path} is not UTF-8 text") from None
    import datasets

    datasets.disable_progress_bars()
    builder = "parquet" if path.suffix == ".parquet" else "json"
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for unreadable files
        raise UserError(f"{key.rsplit('.', 1)[0]}.text: cannot read {path} ({type(error).__name__})") from None
    return _column(table, field, key, str(path))


def _hub_documents(source, key: str) -> list[str]:
    import datasets

    offline = any(os.environ.get(name, "0") not in ("", "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not _hub_reachable():
        raise UserError(
            f"{key}.hub: cannot reach the Hugging Face hub to load {source.hub!r} (offline?); set HF_DATASETS_OFFLINE=1 "
            "to use a copy cached earlier, or point `text:` at local files"
        )
    try:
        if source.max_documents is None:
            table = datasets.load_dataset(source.hub, source.config, split=source.split)
            return _column(table, source.field, f"{key}.field", source.hub)
        # a capped read streams the first rows instead of downloading the whole dataset
        rows = datasets.load_dataset(source.hub, source.config, split=source.split, streaming=True)
        documents = []
        for row in itertools.islice(rows, source.max_documents):
            _check_column(source.field, list(row), f"{key}.field", source.hub)
            documents.append(row[source.field])
        return _texts(documents)
    except UserError:
        raise
    except Exception as error:  # unknown name, bad config, lost connection: datasets raises many types
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"{key}.hub: cannot load dataset {source.hub!r} ({reason})") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection attempt, instead of datasets' half a minute of retries when there is no network."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _column(table, field: str, key: str, where: str) -> list[str]:
    _check_column(field, table.column_names, key, where)
    return _texts(table[field])


def _check_column(field: str, columns: list[str], key: str, where: str) -> None:
    if field not in columns:
        raise UserError(f"{key}: column {field!r} not in {where} (columns: {', '.join(columns)})")


def _texts(values) -> list[str]:
    return [text for text in values if isinstance(text, str) and text.strip()]
