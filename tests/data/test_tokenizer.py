"""Tokenizers: bytes are byte values, BPE splits digits and is cached, folders load locally, bad specs fail clearly."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lctk.data.tokenizer import END_OF_TEXT, build_tokenizer, check_tokenizer_spec, load_local_tokenizer
from lctk.errors import UserError

TEXT = ["The pass key is 12345. Remember it.", "héllo wörld\n\ttabs and 2026 numbers"] * 40


def test_bytes_tokenizer_ids_are_utf8_bytes_and_round_trip():
    tokenizer = build_tokenizer("bytes", None, None)
    text = "héllo\n\t<|endoftext|> 42"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == list("héllo".encode())[:3]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == tokenizer.eos_token_id == 256


def test_bpe_is_trained_once_splits_digits_and_reloads_from_its_folder(tmp_path):
    calls = []

    def text():
        calls.append(1)
        return TEXT

    first = build_tokenizer("bpe:300", text, tmp_path)
    assert len(first) <= 300 and first.eos_token == END_OF_TEXT
    tokens = first.tokenize(" 12345")
    assert [t for t in tokens if t.isdigit()] == list("12345")
    again = build_tokenizer("bpe:300", text, tmp_path)
    assert again.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert len(list((tmp_path / "tokenizers").glob("bpe-300-*.json"))) == 1
    first.save_pretrained(tmp_path / "saved")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert loaded(TEXT[1])["input_ids"] == first(TEXT[1])["input_ids"]
    assert load_local_tokenizer(str(tmp_path / "saved")).eos_token == END_OF_TEXT


@pytest.mark.parametrize("spec", ["bpe:12", "bpe:x", "bpe:", ""])
def test_bad_specs_are_rejected(spec):
    with pytest.raises(ValueError):
        check_tokenizer_spec(spec)


def test_missing_folder_names_the_tokenizer_key(tmp_path):
    with pytest.raises(UserError, match="^tokenizer: tokenizer folder .* not found"):
        build_tokenizer(str(tmp_path / "none"), None, tmp_path)


def test_a_folder_without_tokenizer_files_says_so(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^tokenizer: no tokenizer in .* \(none of tokenizer.json, tokenizer.model"):
        load_local_tokenizer(str(tmp_path))


def test_bpe_for_synthetic_sources_only_is_learned_from_the_builtin_corpus(tmp_path, monkeypatch):
    """recipes/recall-sweep: `tokenizer: bpe:8192` with MQAR sources only (the ids are all MQAR needs)."""
    from lctk.data.pipeline import load_tokenizer
    from lctk.recipe import DataSection, Source
    from lctk.tasks import corpus

    monkeypatch.setattr(corpus, "builtin_documents", lambda split="all": tuple(TEXT))
    data = DataSection(seq_len=64, sources=[Source(task="mqar")], cache_dir=str(tmp_path))
    learned = load_tokenizer("bpe:300", data).backend_tokenizer.to_str()
    assert learned == build_tokenizer("bpe:300", lambda: TEXT, tmp_path).backend_tokenizer.to_str()
