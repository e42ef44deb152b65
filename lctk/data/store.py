"""The token store: a text source tokenised once into memory-mapped shards on disk, which every process maps.

`<cache_dir>/stores/<name>/`, name = a hash of the source's identity, `max_tokens`, the tokenizer's fingerprint and
FORMAT_VERSION:

    manifest.json    what the store was built from, its dtype and counts, each file's size and the checksum of
                     each of its blocks of BLOCK_BYTES; written last
    damaged.json     only when a reader found bytes that fail their checksum: the next open rebuilds the store
    00000.tokens     token ids of whole documents, back to back: uint16 when the vocabulary fits, else uint32
    00000.offsets    int64: where each document of the shard starts, then the shard's end (documents + 1 values)
    00001.tokens     ... a shard is closed after the document that takes it past SHARD_TOKENS tokens

Building streams the documents (lctk.data.text) in batches of about BATCH_CHARS characters; the tokenizers library
encodes each batch on all cores (its own thread pool), and the ids are appended to the open shard's file, so memory
holds one batch whatever the size of the corpus. `max_tokens` cuts the last document so that the store holds exactly
that many tokens.

Everything is written into a temporary folder beside the store and renamed into place once complete, so a folder
with a manifest is whole. A build that fails (a full disk, an unwritable cache folder, a bad source, Ctrl-C) removes
its temporary folder; a killed one leaves it, and the next run removes the temporary folders of dead builds on this
host and builds again. When `max_tokens` gives the size, free space is checked before the first write.

Integrity: no byte of a token shard reaches a reader before its block has been checked. The manifest holds an xxh3-64
checksum of every BLOCK_BYTES block of every file (written from the files as they lie on disk once built). Opening
checks the manifest against the source and tokenizer, every file's size, and every block of the offsets files (read
whole by every reader); the token ids are checked block by block, the first time this process reads from a block
(`TokenStore.document`), or all of them at open when the store holds at most EAGER_BYTES of ids. Damage found at
open rebuilds the store after one warning line. Damage found while reading stops the reader with one error line,
before it uses the bytes, and leaves damaged.json so that the next run rebuilds the store (when the folder is
read-only, the line says to remove it). Each process checks each block it reads once, so checking costs one pass
over the blocks a process uses, at xxh3's speed (several GB/s; `python -m lctk.bench data` measures it). Reusing a
store writes nothing, so a store on a shared (even read-only) filesystem serves every node.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import xxhash

from lctk.data.text import TextSource
from lctk.data.tokenizer import encode_batch, fingerprint
from lctk.errors import UserError, os_error_cause, os_error_of
from lctk.files import (
    atomic_file,
    check_space,
    move_into_place,
    private_name,
    remove_dead_leftovers,
    scratch_folder,
)

FORMAT_VERSION = 2  # 2: a checksum per block
MANIFEST = "manifest.json"
DAMAGED = "damaged.json"
SHARD_TOKENS = 1 << 26  # 128 MiB of uint16 ids per shard
BATCH_CHARS = 1 << 22  # characters tokenised per encode_batch call
BLOCK_BYTES = 1 << 20  # one checksum per MiB: a reader's first row from a block reads that MiB once more
EAGER_BYTES = 1 << 28  # stores of up to 256 MiB of ids (128M uint16 tokens) are checked whole at open: < 0.1 s


class TokenStore:
    """Documents of token ids held in shards of (ids, offsets) arrays: memory maps of a store folder, whose ids are
    checked block by block as they are first read (`checks`, one per shard), or arrays for documents given in memory
    (`from_documents`)."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray]], path: Path | None = None,
                 checks: list[BlockChecks] | None = None):
        self.shards, self.path, self.checks = shards, path, checks
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
        start, end = int(offsets[local]), int(offsets[local + 1])
        if self.checks is not None and self.checks[shard].unchecked:
            try:
                self.checks[shard].check(start * tokens.itemsize, end * tokens.itemsize)
            except DamagedStore as problem:
                raise self._damaged(problem) from None
        return tokens[start:end]

    def _damaged(self, problem: DamagedStore) -> UserError:
        """Leave damaged.json so that the next open rebuilds the store, and say so."""
        try:
            with atomic_file(self.path / DAMAGED) as out:
                json.dump({"problem": str(problem), "found": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, out)
            then = "run the command again to rebuild it (with --resume auto a train or distill run continues)"
        except (OSError, UserError):  # a read-only store
            then = f"remove {self.path} and run the command again to rebuild it"
        return UserError(f"token store {self.path} is damaged ({problem}); stopped before using those bytes; {then}")


class DamagedStore(Exception):
    pass


class BlockChecks:
    """The checksum of every BLOCK_BYTES block of one file of a store, and which blocks of its memory map this process
    has checked: `check(start, end)` checks the blocks a byte range touches, once each."""

    def __init__(self, name: str, data: np.ndarray, block_bytes: int, checksums: list[str]):
        if len(checksums) != -(-data.nbytes // block_bytes):
            raise DamagedStore(f"its {MANIFEST} lists {len(checksums)} block checksums for {name}")
        self.name, self.data, self.block_bytes, self.checksums = name, data.view(np.uint8), block_bytes, checksums
        self.pending = np.ones(len(checksums), dtype=bool)
        self.unchecked = len(checksums)

    def check(self, start: int = 0, end: int | None = None) -> None:
        end = len(self.data) if end is None else end
        if end <= start:
            return
        first, last = start // self.block_bytes, (end - 1) // self.block_bytes
        for block in np.flatnonzero(self.pending[first : last + 1]) + first:
            at = int(block) * self.block_bytes
            if block_checksum(self.data[at : at + self.block_bytes]) != self.checksums[block]:
                end = min(at + self.block_bytes, len(self.data))
                raise DamagedStore(f"{self.name} bytes {at}-{end} do not match their checksum")
            self.pending[block] = False
            self.unchecked -= 1


def block_checksum(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def file_checksums(path: Path, block_bytes: int) -> list[str]:
    """The checksum of each block of a file, read back as it lies on disk."""
    with open(path, "rb") as handle:
        return [block_checksum(block) for block in iter(lambda: handle.read(block_bytes), b"")]


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
    """Memory maps of a complete store, checked as the module docstring says; DamagedStore when it is incomplete,
    damaged, marked damaged by a reader, or (given `identity`) built from another source or tokenizer."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise DamagedStore(f"no readable {MANIFEST}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or (
            identity is not None and manifest.get("identity") != identity):
        raise DamagedStore(f"its {MANIFEST} names another source, tokenizer or format")
    if (folder / DAMAGED).exists():
        raise DamagedStore(f"a reader found damaged bytes and left {DAMAGED}")
    try:
        shards, checks = [], []
        for shard in manifest["shards"]:
            tokens, token_checks = _mapped(folder, manifest, shard["tokens_file"], manifest["dtype"])
            offsets, offset_checks = _mapped(folder, manifest, shard["offsets_file"], "int64")
            offset_checks.check()  # every reader reads the offsets whole (document lengths)
            shards.append((tokens, offsets))
            checks.append(token_checks)
    except (KeyError, TypeError, ValueError, AttributeError):  # a manifest with missing or mistyped entries
        raise DamagedStore(f"its {MANIFEST} is malformed") from None
    if sum(tokens.nbytes for tokens, _ in shards) <= EAGER_BYTES:
        for token_checks in checks:
            token_checks.check()
    return TokenStore(shards, folder, checks)


def _mapped(folder: Path, manifest: dict, name: str, dtype: str) -> tuple[np.ndarray, BlockChecks]:
    """A file's memory map, its size checked, with its blocks' checksums."""
    path, recorded = folder / name, manifest["files"][name]
    if not path.is_file() or path.stat().st_size != recorded["bytes"]:
        raise DamagedStore(f"{name} is missing or not {recorded['bytes']} bytes")
    data = np.memmap(path, dtype=dtype, mode="r")
    return data, BlockChecks(name, data, int(manifest["block_bytes"]), list(recorded["blocks"]))


def _build(text: TextSource, max_tokens: int | None, tokenizer, folder: Path, identity: dict) -> None:
    stores = folder.parent
    temporary = stores / private_name(f".{folder.name}")
    try:
        stores.mkdir(parents=True, exist_ok=True)
        remove_dead_leftovers(stores, f".{folder.name}")  # builds of this store that were killed
        if max_tokens is not None:
            check_space(stores, max_tokens * id_dtype(tokenizer).itemsize, f"the token store of {text.key} in {stores}")
        with scratch_folder(temporary):  # removed on any failure: a full disk, a bad source, Ctrl-C
            started = time.perf_counter()
            manifest = _write_shards(text, max_tokens, tokenizer, temporary)
            manifest |= {"format": FORMAT_VERSION, "identity": identity,
                         "built_s": round(time.perf_counter() - started, 1)}
            (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
            move_store_into_place(temporary, folder)
    except Exception as error:
        fault = os_error_of(error)  # a full disk or an unwritable cache folder
        if fault is None:
            raise
        raise UserError(f"data.cache_dir: cannot write the token store of {text.key} in {stores} "
                        f"({os_error_cause(fault)})") from None
    seconds = manifest["built_s"]
    print(f"token store: {manifest['tokens'] / 1e6:.2f}M tokens in {manifest['documents']} documents from "
          f"{text.key}, built in {seconds:.1f}s ({manifest['tokens'] / max(seconds, 1e-3) / 1e6:.2f}M tok/s) -> "
          f"{folder}", flush=True)


def move_store_into_place(temporary: Path, folder: Path) -> None:
    if folder.exists():
        try:
            open_store(folder)
            shutil.rmtree(temporary)  # a concurrent build finished first: keep its store
            return
        except DamagedStore:
            pass
    move_into_place(temporary, folder)


def id_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def _write_shards(text: TextSource, max_tokens: int | None, tokenizer, folder: Path) -> dict:
    writer = ShardWriter(folder, id_dtype(tokenizer))
    expected = text.expected_documents()
    started = time.perf_counter()
    with _progress_bar(text.key) as progress:
        task = progress.add_task("", total=None, documents=0, rate="")
        for batch in _char_batches(text.batches()):
            ids, lengths = encode_batch(tokenizer, batch, writer.dtype)
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
            _append(tokens_file, ids[before:after])
            _append(offsets_file, (shard_tokens + ends[done:until] - before).astype(np.int64))
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
                "block_bytes": BLOCK_BYTES, "files": self.files}

    def _start(self) -> None:
        number = len(self.shards)
        tokens_file = open(self.folder / f"{number:05d}.tokens", "wb")
        offsets_file = open(self.folder / f"{number:05d}.offsets", "wb")
        _append(offsets_file, np.zeros(1, dtype=np.int64))
        self._open = (tokens_file, offsets_file, 0, 0)

    def _finish(self) -> None:
        tokens_file, offsets_file, tokens, documents = self._open
        names = []
        for handle in (tokens_file, offsets_file):
            handle.close()
            path = Path(handle.name)
            self.files[path.name] = {"bytes": path.stat().st_size, "blocks": file_checksums(path, BLOCK_BYTES)}
            names.append(path.name)
        self.shards.append({"tokens_file": names[0], "offsets_file": names[1], "tokens": tokens, "documents": documents})
        self._open = None


def _append(handle, array: np.ndarray) -> None:
    """Through the file object, not ndarray.tofile: a failed write then raises its OSError (a full disk), where
    tofile reports only a short count."""
    handle.write(np.ascontiguousarray(array).data)


def _progress_bar(key: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"tokenising {key}"), BarColumn(),
        TextColumn("{task.completed:,.0f} tokens, {task.fields[documents]:,} documents, {task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )
