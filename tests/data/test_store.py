"""The token store: built once, reused, rebuilt when the source or tokenizer changes or the store is damaged or was
killed mid-build; rows drawn from it tile the documents; a failing build leaves nothing behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from disk_faults import failing_writes, unwritable

from lctk.data import store as store_module
from lctk.data.packing import Pieces, StepBatches, TextRows, split_held_out
from lctk.data.store import TokenStore, token_store
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.recipe import Source

TEXTS = [f"document {i}: " + "words and more words " * (i % 13 + 1) for i in range(300)]


@pytest.fixture
def bytes_tokenizer():
    return build_tokenizer("bytes", None, None)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for shard in range(3):
        rows = TEXTS[shard * 100 : (shard + 1) * 100]
        (folder / f"part-{shard}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows) + "\n")
    return folder


@pytest.fixture
def small_shards(monkeypatch):
    """Several shards and encode batches even for a small corpus."""
    monkeypatch.setattr(store_module, "SHARD_TOKENS", 4000)
    monkeypatch.setattr(store_module, "BATCH_CHARS", 3000)


def test_store_holds_every_document_exactly_in_memory_mapped_shards(corpus, tmp_path, bytes_tokenizer, small_shards):
    store = token_store(Source(text=str(corpus)), "data.sources.0", bytes_tokenizer, tmp_path / "cache")
    assert len(store) == len(TEXTS) and store.tokens == sum(len(t.encode()) for t in TEXTS)
    assert [bytes(store.document(i).tolist()).decode() for i in range(len(store))] == TEXTS
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert len(store.shards) == len(manifest["shards"]) > 3 and manifest["dtype"] == "uint16"
    assert all(isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 for tokens, _ in store.shards)
    assert manifest["identity"]["source"]["files"][0][0].endswith("part-0.jsonl")
    assert not [p for p in store.path.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_max_tokens_cuts_the_source_at_exactly_that_many_tokens(corpus, tmp_path, bytes_tokenizer, small_shards):
    store = token_store(Source(text=str(corpus), max_tokens="5k"), "s", bytes_tokenizer, tmp_path / "cache")
    assert store.tokens == 5000
    last = len(store) - 1
    assert TEXTS[last].encode().startswith(bytes(store.document(last).tolist()))
    assert [bytes(store.document(i).tolist()).decode() for i in range(last)] == TEXTS[:last]


def test_rows_tile_the_documents_and_the_held_out_split_never_overlaps_training():
    """Token ids unique across documents: every training token is in exactly one row of an epoch (except the tail
    that does not fill a row), positions restart at 0 exactly at piece starts, no held-out token is trained on."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=400)
    documents = [np.arange(start, start + n) for start, n in zip(np.cumsum([0, *lengths[:-1]]), lengths)]
    eos, seq_len = -1, 32
    pieces = Pieces.cut(TokenStore.from_documents(documents), seq_len, eos)
    for d, document in enumerate(documents):  # pieces tile each document + end-of-text, none longer than seq_len
        mine = np.flatnonzero(pieces.document == d)
        assert np.array_equal(np.concatenate([pieces[k] for k in mine]), np.append(document, eos))
        assert all(len(pieces[k]) <= seq_len for k in mine)
    train, held = split_held_out(pieces, 0.05)
    rows = TextRows(train, seq_len, seed=4)
    epoch = [rows.row(i) for i in range(len(rows))]
    ids = np.concatenate([r.input_ids for r in epoch])
    trained = ids[ids != eos]
    assert len(np.unique(trained)) == len(trained)  # once per epoch
    training_tokens = np.concatenate([train[k] for k in range(len(train))])
    assert train.tokens - len(ids) < seq_len and set(trained) <= set(training_tokens)
    held_tokens = np.concatenate([held[k] for k in range(len(held))])
    assert not set(held_tokens[held_tokens != eos]) & set(training_tokens[training_tokens != eos])
    first = np.cumsum([0, *lengths[:-1]])
    for row in epoch:  # a token's position restarts at 0 exactly where a piece starts (and at the row's start)
        tokens, positions = row.input_ids[1:], row.position_ids[1:]
        offset = tokens - first[np.searchsorted(first, tokens, side="right") - 1]
        assert np.array_equal((positions == 0)[tokens != eos], (offset % seq_len == 0)[tokens != eos])
        assert row.position_ids[0] == 0
    assert np.array_equal(TextRows(train, seq_len, seed=4).row(len(rows) + 7).input_ids,
                          rows.row(len(rows) + 7).input_ids)  # resume: a fresh source gives the same row
    # two processes take disjoint slices of every global batch, together the single process's batch
    one = StepBatches(rows, batch_size=4, grad_accum=1)
    ranks = [StepBatches(rows, batch_size=2, grad_accum=1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5):
        halves = [set(b(step)[0]["input_ids"].flatten().tolist()) - {eos} for b in ranks]
        assert not halves[0] & halves[1]
        assert halves[0] | halves[1] == set(one(step)[0]["input_ids"].flatten().tolist()) - {eos}


def test_unchanged_source_reuses_the_store_and_a_changed_source_or_tokenizer_rebuilds(corpus, tmp_path, capsys,
                                                                                   bytes_tokenizer):
    source, cache = Source(text=str(corpus)), tmp_path / "cache"
    first = token_store(source, "s", bytes_tokenizer, cache)
    assert "token store: " in capsys.readouterr().out
    started = time.perf_counter()
    again = token_store(source, "s", bytes_tokenizer, cache)
    assert time.perf_counter() - started < 1 and again.path == first.path
    assert capsys.readouterr().out == ""  # reused: nothing built
    with open(corpus / "part-2.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    changed = token_store(source, "s", bytes_tokenizer, cache)
    assert changed.path != first.path and len(changed) == len(TEXTS) + 1
    bpe = build_tokenizer("bpe:300", lambda: TEXTS, tmp_path / "tokenizers")
    other = token_store(source, "s", bpe, cache)
    assert other.path not in (first.path, changed.path) and other.tokens < changed.tokens


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "manifest entry"])
def test_a_damaged_store_is_rebuilt_with_one_warning(corpus, tmp_path, capfd, bytes_tokenizer, small_shards, damage):
    source, cache = Source(text=str(corpus)), tmp_path / "cache"
    path = token_store(source, "s", bytes_tokenizer, cache).path
    shard = path / "00001.tokens"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "manifest":
        (path / "manifest.json").write_text('{"format": 1, "shards": [')
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["files"]["00001.offsets"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    capfd.readouterr()
    store = token_store(source, "s", bytes_tokenizer, cache)
    warnings = capfd.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: token store {path} is damaged")
    assert store.path == path and [bytes(store.document(i).tolist()).decode() for i in range(len(store))] == TEXTS


@pytest.mark.slow
def test_a_build_killed_midway_is_detected_and_rebuilt(corpus, tmp_path, bytes_tokenizer):
    """A real SIGKILL in the middle of writing shards: no store appears, the next run removes the dead build's
    temporary folder and builds the whole store."""
    cache = tmp_path / "cache"
    slow_build = f"""
import time
from pathlib import Path
from lctk.data import store
from lctk.data.tokenizer import build_tokenizer
from lctk.recipe import Source
store.SHARD_TOKENS = 2000
store._char_batches = lambda batches: ([document] for batch in batches for document in batch)  # one per call
encode = store.encode_batch
store.encode_batch = lambda *args: (time.sleep(0.2), encode(*args))[1]
store.token_store(Source(text={str(corpus)!r}), "s", build_tokenizer("bytes", None, None), Path({str(cache)!r}))
"""
    build = subprocess.Popen([sys.executable, "-c", slow_build], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(cache.glob("stores/.*.tmp/00001.tokens")):
        assert build.poll() is None and time.time() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert [p.name for p in (cache / "stores").iterdir()] == [f"{p.name}" for p in cache.glob("stores/.*.tmp")]
    store = token_store(Source(text=str(corpus)), "s", bytes_tokenizer, cache)
    assert [bytes(store.document(i).tolist()).decode() for i in range(len(store))] == TEXTS
    assert [p for p in (cache / "stores").iterdir()] == [store.path]  # the dead build's folder is gone


def test_an_unwritable_cache_folder_is_one_error_line_naming_it(corpus, tmp_path, bytes_tokenizer):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(UserError) as error:
        token_store(Source(text=str(corpus)), "data.sources.0", bytes_tokenizer, blocker / "cache")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"data.cache_dir: cannot write the token store of data.sources.0 in {blocker}/cache/stores")
    assert blocker.read_text() == "a file where the cache folder should be"


def test_a_full_disk_removes_the_partial_store_and_touches_nothing_else(corpus, tmp_path, bytes_tokenizer):
    """The file-size limit makes writes fail the way a full disk does; the store built before is untouched."""
    cache = tmp_path / "cache"
    kept = token_store(Source(text=str(corpus), max_documents=5), "s", bytes_tokenizer, cache)
    before = {p: p.read_bytes() for p in kept.path.iterdir()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(UserError, match=rf"^data.cache_dir: cannot write the token store of s in {cache}/stores \("):
            token_store(Source(text=str(corpus)), "s", bytes_tokenizer, cache)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert list((cache / "stores").iterdir()) == [kept.path]
    assert {p: p.read_bytes() for p in kept.path.iterdir()} == before


def test_prepare_data_reads_the_store_and_says_where_it_lives(corpus, tmp_path, bytes_tokenizer):
    from lctk.data.pipeline import prepare_data
    from lctk.recipe import DataSection

    data = DataSection(seq_len=64, sources=[Source(text=str(corpus))], cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data, bytes_tokenizer, seed=0)
    (line,) = prepared.summary
    assert "M training tokens in 300 documents" in line and str(tmp_path / "cache" / "stores") in line
    assert prepared.held_out and all(len(r.input_ids) == 64 for r in prepared.held_out)
    assert os.path.commonpath([line.rsplit(" ", 1)[-1].rstrip(")"), str(tmp_path)]) == str(tmp_path)


@pytest.fixture
def small_blocks(monkeypatch):
    """One shard of many small checksummed blocks."""
    monkeypatch.setattr(store_module, "BLOCK_BYTES", 4096)


def damage(shard, how: str) -> None:
    """Change a shard's bytes in place, keeping its size and modification time (as the issue's report did)."""
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    if how == "zero 95%":  # everything but a few pages, wherever a sampling digest would have looked
        kept = len(data) // 40
        data[kept : len(data) - kept] = bytes(len(data) - 2 * kept)
    else:
        at = {"first byte": 0, "last byte": len(data) - 1, "block boundary": 3 * 4096, "middle": len(data) // 2}[how]
        data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns


DAMAGES = ["first byte", "last byte", "block boundary", "middle", "zero 95%"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damage_anywhere_in_a_store_checked_at_open_is_rebuilt(corpus, tmp_path, capfd, bytes_tokenizer, small_blocks,
                                                                how):
    source, cache = Source(text=str(corpus)), tmp_path / "cache"
    path = token_store(source, "s", bytes_tokenizer, cache).path
    manifest = json.loads((path / "manifest.json").read_text())
    assert len(manifest["files"]["00000.tokens"]["blocks"]) == -(-(path / "00000.tokens").stat().st_size // 4096) > 10
    damage(path / "00000.tokens", how)
    capfd.readouterr()
    store = token_store(source, "s", bytes_tokenizer, cache)
    (warning,) = capfd.readouterr().err.strip().splitlines()
    assert warning.startswith(f"warning: token store {path} is damaged (00000.tokens bytes ")
    assert "do not match their checksum); rebuilding it" in warning
    assert [bytes(store.document(i).tolist()).decode() for i in range(len(store))] == TEXTS


@pytest.mark.parametrize("how", DAMAGES)
def test_damage_in_a_store_checked_as_it_is_read_stops_the_reader_before_it_uses_the_bytes(
        corpus, tmp_path, capfd, bytes_tokenizer, small_blocks, monkeypatch, how):
    """A store too big to check at open: every block is checked the first time this process reads from it."""
    monkeypatch.setattr(store_module, "EAGER_BYTES", 0)
    source, cache = Source(text=str(corpus)), tmp_path / "cache"
    path = token_store(source, "s", bytes_tokenizer, cache).path
    damage(path / "00000.tokens", how)
    store = token_store(source, "s", bytes_tokenizer, cache)  # opens without reading the ids
    assert store.checks[0].unchecked == len(store.checks[0].checksums)
    served = []
    with pytest.raises(UserError) as error:
        for index in range(len(store)):
            served.append(bytes(store.document(index).tolist()).decode())
    assert served == TEXTS[: len(served)]  # no damaged byte was handed out
    message = str(error.value)
    assert message.startswith(f"token store {path} is damaged (00000.tokens bytes ") and "\n" not in message
    assert message.endswith("stopped before using those bytes; run the command again to rebuild it "
                            "(with --resume auto a train or distill run continues)")
    at = int(message.split("bytes ")[1].split("-")[0])
    offsets = np.fromfile(path / "00000.offsets", dtype=np.int64) * 2
    assert offsets[len(served)] < at + 4096 and at < offsets[len(served) + 1]  # the block of the next document
    capfd.readouterr()
    rebuilt = token_store(source, "s", bytes_tokenizer, cache)
    (warning,) = capfd.readouterr().err.strip().splitlines()
    assert warning == (f"warning: token store {path} is damaged (a reader found damaged bytes and left damaged.json); "
                       "rebuilding it")
    assert [bytes(rebuilt.document(i).tolist()).decode() for i in range(len(rebuilt))] == TEXTS
    assert not (path / "damaged.json").exists()


def test_damage_found_in_a_read_only_store_says_to_remove_it(corpus, tmp_path, bytes_tokenizer, small_blocks,
                                                           monkeypatch):
    monkeypatch.setattr(store_module, "EAGER_BYTES", 0)
    path = token_store(Source(text=str(corpus)), "s", bytes_tokenizer, tmp_path / "cache").path
    damage(path / "00000.tokens", "zero 95%")
    store = store_module.open_store(path)
    with unwritable(monkeypatch, path, read_only=True), pytest.raises(UserError) as error:
        for index in range(len(store)):
            store.document(index)
    assert str(error.value).endswith(f"stopped before using those bytes; remove {path} and run the command again to "
                                     "rebuild it")
    assert sorted(p.name for p in path.iterdir()) == ["00000.offsets", "00000.tokens", "manifest.json"]


def test_a_store_of_known_size_is_refused_before_any_write_when_the_disk_has_no_room(corpus, tmp_path,
                                                                                     bytes_tokenizer, monkeypatch):
    from lctk import files

    monkeypatch.setattr(files, "free_bytes", lambda folder: 3_000_000)
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as error:
        token_store(Source(text=str(corpus), max_tokens="2M"), "data.sources.0", bytes_tokenizer, cache)
    assert str(error.value) == (f"no space left on device writing the token store of data.sources.0 in {cache}/stores: "
                                f"~4.15 MB needed, 3 MB free in {cache}/stores")
    assert list((cache / "stores").iterdir()) == []


@pytest.mark.parametrize("fault", ["full disk", "read-only"])
def test_a_store_build_that_meets_a_disk_fault_is_one_line_and_leaves_nothing(corpus, tmp_path, bytes_tokenizer,
                                                                              monkeypatch, fault):
    cache = tmp_path / "cache"
    (cache / "stores").mkdir(parents=True)
    faulty = (failing_writes(monkeypatch, cache, allowed=5000) if fault == "full disk"
              else unwritable(monkeypatch, cache, read_only=True))
    cause = "no space left on device" if fault == "full disk" else "read-only file system"
    with faulty, pytest.raises(UserError) as error:
        token_store(Source(text=str(corpus)), "data.sources.0", bytes_tokenizer, cache)
    assert str(error.value) == f"data.cache_dir: cannot write the token store of data.sources.0 in {cache}/stores ({cause})"
    assert list((cache / "stores").iterdir()) == []
