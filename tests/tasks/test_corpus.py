"""The builtin corpus: big enough, deterministic, cached on disk, split into disjoint train / held-out documents."""

import json

import pytest
from disk_faults import failing_writes, file_size_limit, unwritable

from lctk.tasks import corpus


def test_corpus_has_a_million_tokens(bpe_tokenizer):
    documents = corpus.builtin_documents()
    assert len(corpus.builtin_text()) > 4_500_000 and len(documents) > 500
    tokens = sum(len(ids) for ids in bpe_tokenizer(list(documents), add_special_tokens=False)["input_ids"])
    assert tokens >= 1_000_000


def test_splits_are_disjoint_and_complete():
    documents = corpus.builtin_documents()
    train, heldout = corpus.builtin_documents("train"), corpus.builtin_documents("heldout")
    assert len(train) + len(heldout) == len(documents) and heldout == documents[:: corpus.HELDOUT_EVERY]
    assert not set(train) & set(heldout)
    with pytest.raises(ValueError, match="split"):
        corpus.builtin_documents("test")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTK_CACHE", str(tmp_path))
    corpus._all_documents.cache_clear()
    yield tmp_path
    corpus._all_documents.cache_clear()


def test_cache_file_is_written_once_and_a_damaged_one_is_rebuilt(fresh_cache, monkeypatch):
    built = []

    def collect():
        built.append(1)
        return iter(["first document " * 20, "second document " * 20])

    monkeypatch.setattr(corpus, "_collect_documents", collect)
    documents = corpus.builtin_documents()
    corpus._all_documents.cache_clear()
    assert corpus.builtin_documents() == documents and len(built) == 1  # read back from disk
    (path,) = fresh_cache.glob("builtin-corpus-*.json")
    assert tuple(json.loads(path.read_text())["documents"]) == documents
    for damaged in ("{ damaged", path.read_text().replace("second", "secOnd", 1)):  # not JSON; JSON, one byte changed
        path.write_text(damaged)
        corpus._all_documents.cache_clear()
        assert corpus.builtin_documents() == documents
    assert len(built) == 3 and json.loads(path.read_text())["documents"] == list(documents)


@pytest.mark.parametrize("fault", ["full disk", "read-only", "file size limit"])
def test_a_cache_that_cannot_be_written_costs_one_warning_and_leaves_no_partial_file(fresh_cache, monkeypatch, capfd,
                                                                                    fault):
    """The cache is only a cache: the corpus comes from memory, one warning names the cause, no tmp file stays."""
    monkeypatch.setattr(corpus, "_collect_documents", lambda: iter([f"document {i} " * 40 for i in range(50)]))
    fresh_cache.mkdir(exist_ok=True)
    if fault == "full disk":
        faulty, cause = failing_writes(monkeypatch, fresh_cache, allowed=1000), "no space left on device writing"
    elif fault == "read-only":
        faulty, cause = unwritable(monkeypatch, fresh_cache, read_only=True), "read-only file system"
    else:
        faulty, cause = file_size_limit(4096), "file too large writing"
    with faulty:
        documents = corpus.builtin_documents()
    assert documents[3] == "document 3 " * 40 and len(documents) == 50
    (warning,) = capfd.readouterr().err.strip().splitlines()
    assert warning.startswith("warning: the builtin corpus is not cached (") and cause in warning
    assert list(fresh_cache.iterdir()) == []  # no partial cache file, no temporary file


@pytest.mark.slow
def test_corpus_build_is_deterministic():
    """Building the documents again from their sources gives the cached corpus, in the same order."""
    assert tuple(corpus._collect_documents()) == corpus.builtin_documents()
