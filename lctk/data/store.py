"""The token store: a text source tokenised once into memory-mapped shards on disk, which every process maps.

`<cache_dir>/stores/<name>/`, name = a hash of the source's identity, `max_tokens`, the tokenizer's fingerprint and
FORMAT_VERSION:

    manifest.json    what the store was built from, its dtype and counts, each file's size and digest; written last
    00000.tokens     token ids of whole documents, back to back: uint16 when the vocabulary fits, else uint32
    00000.offsets    int64: where each document of the shard starts, then the shard's end (documents + 1 values)
    00001.tokens     ... a shard is closed after the document that takes it past SHARD_TOKENS tokens

Building streams the documents (lctk.data.text) in batches of about BATCH_CHARS characters; the tokenizers library
encodes each batch on all cores (its own thread pool), and the ids are appended to the open shard's file, so memory
holds one batch whatever the size of the corpus. `max_tokens` cuts the last document so that the store holds exactly
that many tokens.

Everything is written into a temporary folder beside the store and renamed into place once complete, so a folder
with a manifest is whole. A killed build leaves only its temporary folder: the next run finds no store, removes the
temporary folders of dead builds on this host and builds again. Opening checks the manifest against the source and
tokenizer, and every file's size and digest (the whole file up to FULL_DIGEST_BYTES; beyond that PAGES pages spread
evenly over it, which costs the same at any size and still catches truncation and most damage); a damaged store is
rebuilt after one warning line. Reusing a store writes nothing, so a store on a shared (even read-only) filesystem
serves every node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

from lctk.data.text import TextSource
from lctk.data.tokenizer import encode_batch, fingerprint
from lctk.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 ids per shard
BATCH_CHARS = 1 << 22  # characters tokenised per encode_batch call
FULL_DIGEST_BYTES = 1 << 24
PAGES, PAGE_BYTES = 256, 1 << 12


class TokenStore:
    """Documents of token ids held in shards of (ids, offsets) arrays: memory maps of a store folder, or arrays for
    documents given in memory (`from_documents`)."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]], path: Path | None = None):
        self.shards, self.path = shards, path
        self._first = np.cumsum([0] + [len(offsets) - 1 for _, offsets in shards])  # first document of each shard

    @classmethod
    def from_documents(cls, documents: list[np.ndarray]) -> TokenStore:
        offsets = np.cumsum([0, *map(len, documents)])
        tokens = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents]) if documents else np.zeros(0)
        return cls([(tokens, offsets)])

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def tokens(self) -> int:
        return sum(int(offsets[-1]) for _, offsets in self.shards)

    def lengths(self) -> np.ndarray:
        """The length of every document (int64, one entry per document)."""
        return np.concatenate([np.diff(offsets) for _, offsets in self.shards])

    def document(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        tokens, offsets = self.shards[shard]
        local = index - int(self._first[shard])
        return tokens[int(offsets[local]) : int(offsets[local + 1])]


class DamagedStore(Exception):
    pass


def token_store(source, key: str, tokenizer, cache_dir: Path) -> TokenStore:
    """The store of a `text:` or `hub:` source (`key` names it in errors): reused when this source and tokenizer were
    built before, else built (see the module docstring)."""
    text = TextSource(source, key)
    identity = {"source": text.identity(), "max_tokens": source.max_tokens, "tokenizer": fingerprint(tokenizer),
                "format": FORMAT_VERSION}
    name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir / "stores" / name
    if folder.exists():
        try:
            return open_store(folder, identity)
        except DamagedStore as problem:
            print(f"warning: token store {folder} is damaged ({problem}); rebuilding it", file=sys.stderr, flush=True)
    _build(text, source.max_tokens, tokenizer, folder, identity)
    return open_store(folder, identity)


def open_store(folder: Path, identity: dict | None = None) -> TokenStore:
    """Memory maps of a complete store; DamagedStore when it is incomplete, damaged or (given `identity`) built from
    another source or tokenizer."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DamagedStore(f"no readable {MANIFEST}") from None
    if manifest.get("format") != FORMAT_VERSION or (identity is not None and manifest.get("identity") != identity):
        raise DamagedStore(f"its {MANIFEST} names another source, tokenizer or format")
    try:
        return TokenStore([tuple(_mapped(folder, manifest, shard)) for shard in manifest["shards"]], folder)
    except (KeyError, TypeError, ValueError):  # a manifest with missing or mistyped entries
        raise DamagedStore(f"its {MANIFEST} is malformed") from None


def _mapped(folder: Path, manifest: dict, shard: dict):
    """The shard's token ids and offsets, each checked against its size and digest."""
    for name, dtype in ((shard["tokens_file"], manifest["dtype"]), (shard["offsets_file"], "int64")):
        path, recorded = folder / name, manifest["files"][name]
        if not path.is_file() or path.stat().st_size != recorded["bytes"]:
            raise DamagedStore(f"{name} is missing or not {recorded['bytes']} bytes")
        if _digest(path) != recorded["digest"]:
            raise DamagedStore(f"{name} does not match its digest")
        yield np.memmap(path, dtype=dtype, mode="r")


def _digest(path: Path) -> str:
    """blake2b of the whole file when small, else of its size and PAGES pages spread evenly over it."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as handle:
        if size <= FULL_DIGEST_BYTES:
            digest.update(handle.read())
        else:
            for position in np.linspace(0, size - PAGE_BYTES, PAGES, dtype=np.int64):
                handle.seek(int(position))
                digest.update(handle.read(PAGE_BYTES))
    return digest.hexdigest()


def _build(text: TextSource, max_tokens: int | None, tokenizer, folder: Path, identity: dict) -> None:
    stores = folder.parent
    temporary = stores / f".{folder.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        stores.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(stores, folder.name)
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        started = time.perf_counter()
        manifest = _write_shards(text, max_tokens, tokenizer, temporary)
        manifest |= {"format": FORMAT_VERSION, "identity": identity, "built_s": round(time.perf_counter() - started, 1)}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _move_into_place(temporary, folder)
    except OSError as error:  # a full disk or an unwritable cache folder
        shutil.rmtree(temporary, ignore_errors=True)
        reason = error.strerror or type(error).__name__
        raise UserError(f"data.cache_dir: cannot write the token store of {text.key} in {stores} ({reason})") from None
    except BaseException:  # a bad source, or Ctrl-C: no partial store is left behind
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    seconds = manifest["built_s"]
    print(f"token store: {manifest['tokens'] / 1e6:.2f}M tokens in {manifest['documents']} documents from "
          f"{text.key}, built in {seconds:.1f}s ({manifest['tokens'] / max(seconds, 1e-3) / 1e6:.2f}M tok/s) -> "
          f"{folder}", flush=True)


def _remove_dead_builds(stores: Path, name: str) -> None:
    """Temporary folders that builds of this store on this host left when they were killed."""
    host = socket.gethostname()
    for leftover in stores.glob(f".{name}.{host}.*.tmp"):
        pid = leftover.name.removeprefix(f".{name}.{host}.").removesuffix(".tmp")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _move_into_place(temporary: Path, folder: Path) -> None:
    if folder.exists():
        try:
            open_store(folder)
            shutil.rmtree(temporary)  # a concurrent build finished first: keep its store
            return
        except DamagedStore:
            damaged = temporary.with_suffix(".damaged")
            folder.rename(damaged)
            shutil.rmtree(damaged)
    temporary.rename(folder)


def _write_shards(text: TextSource, max_tokens: int | None, tokenizer, folder: Path) -> dict:
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    writer = ShardWriter(folder, dtype)
    expected = text.expected_documents()
    started = time.perf_counter()
    with _progress_bar(text.key) as progress:
        task = progress.add_task("", total=None, documents=0, rate="")
        for batch in _char_batches(text.batches()):
            ids, lengths = encode_batch(tokenizer, batch, dtype)
            if max_tokens is not None and writer.tokens + len(ids) >= max_tokens:
                ids, lengths = _cut(ids, lengths, max_tokens - writer.tokens)
            writer.add(ids, lengths)
            # the total is estimated from the cap, or from the documents still to come at the mean length so far
            estimates = [max_tokens, expected and writer.tokens * expected // max(writer.documents, 1)]
            rate = writer.tokens / (time.perf_counter() - started)
            progress.update(task, completed=writer.tokens, documents=writer.documents, rate=f"{rate / 1e6:.2f}M tok/s",
                            total=min((e for e in estimates if e), default=None))
            if writer.tokens == max_tokens:
                break
    if not writer.tokens:
        raise UserError(f"{text.key}: no text found in {text.source.label}")
    return writer.close()


def _char_batches(batches) -> list[str]:
    """Document batches regrouped to about BATCH_CHARS characters: enough work for every core per call."""
    pending, chars = [], 0
    for batch in batches:
        pending.extend(batch)
        chars += sum(map(len, batch))
        if chars >= BATCH_CHARS:
            yield pending
            pending, chars = [], 0
    if pending:
        yield pending


def _cut(ids: np.ndarray, lengths: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `keep` tokens of a batch, the document they end in cut short."""
    ends = np.cumsum(lengths)
    count = int(np.searchsorted(ends, keep)) + 1
    lengths = lengths[:count].copy()
    lengths[-1] -= ends[count - 1] - keep
    return ids[:keep], lengths


class ShardWriter:
    """Appends whole documents to the open shard's files and closes a shard after SHARD_TOKENS tokens."""

    def __init__(self, folder: Path, dtype):
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.shards, self.files = [], {}
        self.tokens = self.documents = 0
        self._open: tuple | None = None  # (tokens handle, offsets handle, tokens in the shard, documents in it)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        ends = np.cumsum(lengths)
        done = 0  # documents of this batch written
        while done < len(lengths):
            if self._open is None:
                self._start()
            tokens_file, offsets_file, shard_tokens, shard_documents = self._open
            before = int(ends[done - 1]) if done else 0
            # up to and including the document that takes the shard to SHARD_TOKENS
            until = min(int(np.searchsorted(ends, before + SHARD_TOKENS - shard_tokens)) + 1, len(lengths))
            after = int(ends[until - 1])
            ids[before:after].tofile(tokens_file)
            (shard_tokens + ends[done:until] - before).astype(np.int64).tofile(offsets_file)
            self._open = (tokens_file, offsets_file, shard_tokens + after - before, shard_documents + until - done)
            self.tokens += after - before
            self.documents += until - done
            done = until
            if self._open[2] >= SHARD_TOKENS:
                self._finish()

    def close(self) -> dict:
        if self._open is not None:
            self._finish()
        return {"dtype": self.dtype.name, "documents": self.documents, "tokens": self.tokens, "shards": self.shards,
                "files": self.files}

    def _start(self) -> None:
        number = len(self.shards)
        tokens_file = open(self.folder / f"{number:05d}.tokens", "wb")
        offsets_file = open(self.folder / f"{number:05d}.offsets", "wb")
        np.zeros(1, dtype=np.int64).tofile(offsets_file)
        self._open = (tokens_file, offsets_file, 0, 0)

    def _finish(self) -> None:
        tokens_file, offsets_file, tokens, documents = self._open
        names = []
        for handle in (tokens_file, offsets_file):
            handle.close()
            path = Path(handle.name)
            self.files[path.name] = {"bytes": path.stat().st_size, "digest": _digest(path)}
            names.append(path.name)
        self.shards.append({"tokens_file": names[0], "offsets_file": names[1], "tokens": tokens, "documents": documents})
        self._open = None


def _progress_bar(key: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"tokenising {key}"), BarColumn(),
        TextColumn("{task.completed:,.0f} tokens, {task.fields[documents]:,} documents, {task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
