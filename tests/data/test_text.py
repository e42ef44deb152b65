"""Text sources: local txt / jsonl / parquet / csv files, folders of them, save_to_disk folders, streamed in batches,
with clear errors."""

from __future__ import annotations

import json

import pytest

from lctk.data import text as text_module
from lctk.data.store import token_store
from lctk.data.text import TextSource
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.recipe import Source


def documents(source: Source, key: str = "s") -> list[str]:
    return list(TextSource(source, key).documents())


def test_txt_jsonl_parquet_csv_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    pq.write_table(pa.table({"body": ["p0", "p1"]}), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text('body,other\n"c0, with a comma",1\nc1,2\n')
    assert documents(Source(text=str(tmp_path / "a.txt"))) == ["first document"]
    assert documents(Source(text=str(tmp_path / "b.jsonl"), field="body")) == ["row 0", "row 1", "row 2"]
    assert documents(Source(text=str(tmp_path / "c.parquet"), field="body")) == ["p0", "p1"]
    assert documents(Source(text=str(tmp_path / "d.csv"), field="body")) == ["c0, with a comma", "c1"]
    folder = Source(text=str(tmp_path), field="body", max_documents=6)
    assert documents(folder) == ["first document", "row 0", "row 1", "row 2", "p0", "p1"]
    assert TextSource(folder, "s").expected_documents() == 6


def test_a_folder_of_many_shards_streams_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(text_module, "BATCH_ROWS", 4)
    for shard in range(5):
        (tmp_path / f"shard-{shard:02d}.jsonl").write_text("\n".join(json.dumps({"text": f"{shard}.{i}"}) for i in range(7)))
    source = TextSource(Source(text=str(tmp_path)), "s")
    batches = list(source.batches())
    assert max(map(len, batches)) <= 4
    assert sum(batches, []) == [f"{shard}.{i}" for shard in range(5) for i in range(7)]
    assert source.expected_documents() == 35 - 5  # newlines: the last line of each file has none


def test_save_to_disk_folders(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["s0", "s1", ""]}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["v0"]})}).save_to_disk(tmp_path / "dict")
    assert documents(Source(text=str(tmp_path / "one"))) == ["s0", "s1"]
    assert documents(Source(text=str(tmp_path / "dict"), split="validation")) == ["v0"]
    with pytest.raises(UserError, match=r"^data.sources.0.split: no split 'train' in .*dict \(splits: validation\)$"):
        documents(Source(text=str(tmp_path / "dict")), "data.sources.0")


def test_errors_name_the_source_key_and_file(tmp_path):
    with pytest.raises(UserError, match=r"^data.sources.2.text: file .*missing.txt not found"):
        documents(Source(text=str(tmp_path / "missing.txt")), "data.sources.2")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(UserError, match=r"^data.sources.0.field: column 'text' not in .*b.jsonl \(columns: body\)$"):
        documents(Source(text=str(tmp_path / "b.jsonl")), "data.sources.0")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"^data.sources.0.text: cannot read .*bad.parquet \(.*\)$"):
        documents(Source(text=str(tmp_path / "bad.parquet")), "data.sources.0")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    (tmp_path / ".hidden").write_text("skipped")
    with pytest.raises(UserError, match=r"^data.sources.0.text: .*notes.pdf in folder .* is not a .*\.csv.* file$"):
        TextSource(Source(text=str(tmp_path), field="body"), "data.sources.0")


def test_hub_without_network_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(text_module, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match=r"^data.sources.1.hub: cannot reach the Hugging Face hub"):
        documents(Source(hub="someone/some-data"), "data.sources.1")


def test_hub_sources_stream_and_stop_at_max_documents_or_max_tokens(monkeypatch, tmp_path):
    import datasets

    calls = {}

    def fake_load(name, config, split, revision, streaming):
        calls.update(name=name, revision=revision, streaming=streaming)
        return datasets.IterableDataset.from_generator(endless)

    def endless():  # only a stream can serve it
        for i in range(10**12):
            yield {"text": f"doc {i}"}

    monkeypatch.setattr(text_module, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    source = Source(hub="someone/big", revision="v1", max_documents=2500)
    assert documents(source)[-1] == "doc 2499" and len(documents(source)) == 2500
    assert calls == {"name": "someone/big", "revision": "v1", "streaming": True}
    assert TextSource(source, "s").expected_documents() == 2500
    capped = token_store(Source(hub="someone/big", max_tokens="20k"), "s", build_tokenizer("bytes", None, None), tmp_path)
    assert capped.tokens == 20_000 and bytes(capped.document(0).tolist()) == b"doc 0"
    assert capped.path.parent == tmp_path / "stores"
