"""Text sources: local txt / jsonl / parquet files and folders, the on-disk token cache, and clear errors."""

from __future__ import annotations

import json

import pytest

from lctk.data import text as text_module
from lctk.data.text import read_documents, tokenized_documents
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.recipe import Source


def test_txt_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)))
    pq.write_table(pa.table({"body": ["p0", "p1"]}), tmp_path / "c.parquet")
    assert read_documents(Source(text=str(tmp_path / "a.txt")), "s") == ["first document"]
    assert read_documents(Source(text=str(tmp_path / "b.jsonl"), field="body"), "s") == ["row 0", "row 1", "row 2"]
    assert read_documents(Source(text=str(tmp_path / "c.parquet"), field="body"), "s") == ["p0", "p1"]
    folder = read_documents(Source(text=str(tmp_path), field="body", max_documents=4), "s")
    assert folder == ["first document", "row 0", "row 1", "row 2"]


def test_errors_name_the_source_key(tmp_path):
    with pytest.raises(UserError, match=r"^data.sources.2.text: file .*missing.txt not found"):
        read_documents(Source(text=str(tmp_path / "missing.txt")), "data.sources.2")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(UserError, match=r"^data.sources.0.field: column 'text' not in .*b.jsonl \(columns: body\)"):
        read_documents(Source(text=str(tmp_path / "b.jsonl")), "data.sources.0")


def test_hub_without_network_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setattr(text_module, "_hub_reachable", lambda: False)
    with pytest.raises(UserError, match=r"^data.sources.1.hub: cannot reach the Hugging Face hub"):
        read_documents(Source(hub="someone/some-data"), "data.sources.1")


def test_tokenised_documents_are_cached_on_disk(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("some text to tokenise")
    tokenizer = build_tokenizer("bytes", None, None)
    source = Source(text=str(tmp_path / "a.txt"))
    first = tokenized_documents(source, "s", tokenizer, tmp_path / "cache")
    assert first[0].tolist() == list(b"some text to tokenise")
    monkeypatch.setattr(text_module, "read_documents", lambda *a: pytest.fail("cache not used"))
    again = tokenized_documents(source, "s", tokenizer, tmp_path / "cache")
    assert again[0].tolist() == first[0].tolist()
