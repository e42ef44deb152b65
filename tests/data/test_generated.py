"""Teacher-generated data: at temperature 0 the store holds the teacher's greedy continuations (against
model.generate), an identical rerun reuses the store and a changed setting or teacher builds another, a killed build
keeps its finished batches, processes' shares pack into the same store as one process, and bad settings are one line
naming the key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.data.generated import GeneratedSource, Teacher, generate_sources
from lctk.data.pipeline import prepare_data
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.evals.fingerprints import weights_fingerprint
from lctk.recipe import DataSection, load_recipe

WORDS = "the cat sat on a mat and then ran far away from every dog in town".split()
PROMPT, NEW = 8, 12


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("bytes", None, None)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompt_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    rng = np.random.default_rng(0)
    for index in range(12):
        (folder / f"doc-{index:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=30)))
    return folder


def _data(prompt_text, cache, **settings):
    generate = {"prompts": str(prompt_text), "tokens": 5 * NEW, "prompt_tokens": PROMPT, "max_new_tokens": NEW,
                "temperature": 0.0, "batch_size": 2, **settings}
    return DataSection(seq_len=48, held_out=0.2, cache_dir=str(cache), sources=[{"generate": generate}])


def _source(data, tokenizer, teacher):
    generator = Teacher(teacher, weights_fingerprint)
    return GeneratedSource(data.sources[0], "data.sources.0", data, tokenizer, generator, Path(data.cache_dir))


def _documents(store):
    return [np.asarray(store.document(i)).tolist() for i in range(len(store))]


def test_greedy_generation_is_the_teachers_own_continuation(prompt_text, tmp_path, tokenizer, teacher):
    data = _data(prompt_text, tmp_path)
    source = _source(data, tokenizer, teacher)
    store = source.build()
    documents = _documents(store)
    assert len(documents) == 5  # ceil(tokens / max_new_tokens) prompts
    for index, document in enumerate(documents):
        prompt = torch.tensor([document[:PROMPT]])
        assert document[:PROMPT] == source.prompt_pieces[index][:PROMPT].tolist()
        with torch.no_grad():
            expected = teacher.generate(prompt, max_new_tokens=NEW, do_sample=False, top_k=None,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = expected[0, PROMPT:].tolist()
        if tokenizer.eos_token_id in expected:
            expected = expected[: expected.index(tokenizer.eos_token_id)]
        assert document[PROMPT:] == expected
    assert not source.work.exists()  # the finished batches are packed and removed

    rows = prepare_data(data, tokenizer, seed=0, teacher=Teacher(teacher, weights_fingerprint))
    as_text = DataSection(seq_len=48, held_out=0.2, cache_dir=str(tmp_path), sources=[{"text": str(prompt_text)}])
    expected_rows = prepare_data(as_text, tokenizer, seed=0).held_out
    assert rows.held_out and len(rows.held_out) == len(expected_rows)  # the prompt text's held-out rows
    for row, expected_row in zip(rows.held_out, expected_rows, strict=True):
        assert np.array_equal(row.input_ids, expected_row.input_ids)
    with pytest.raises(UserError, match=r"^data\.sources\.0\.generate: only a distill recipe has a teacher"):
        prepare_data(data, tokenizer, seed=0)


def test_a_rerun_reuses_the_store_and_a_change_builds_another(prompt_text, tmp_path, tokenizer, teacher, monkeypatch):
    first = _source(_data(prompt_text, tmp_path), tokenizer, teacher).build()
    calls = []
    original = GeneratedSource._generate
    monkeypatch.setattr(GeneratedSource, "_generate", lambda self, chunk: calls.append(chunk) or original(self, chunk))
    again = _source(_data(prompt_text, tmp_path), tokenizer, teacher).build()
    assert again.path == first.path and not calls
    sampled = _source(_data(prompt_text, tmp_path, temperature=1.0, top_p=0.9), tokenizer, teacher).build()
    assert sampled.path != first.path and calls == [0, 1, 2]
    changed = LlamaForCausalLM(teacher.config).eval()
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.model.norm.weight[0] += 1
    assert _source(_data(prompt_text, tmp_path), tokenizer, changed).build().path not in (first.path, sampled.path)


def test_a_killed_build_keeps_its_batches_and_shares_pack_like_one_process(prompt_text, tmp_path, tokenizer, teacher,
                                                                          monkeypatch):
    whole = _documents(_source(_data(prompt_text, tmp_path / "one", temperature=1.0), tokenizer, teacher).build())
    source = _source(_data(prompt_text, tmp_path / "two", temperature=1.0), tokenizer, teacher)
    calls = []
    original = GeneratedSource._generate

    def killed_at_the_third_batch(self, chunk):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk)
        return original(self, chunk)

    monkeypatch.setattr(GeneratedSource, "_generate", killed_at_the_third_batch)
    source.work.mkdir(parents=True)
    source._generate_share(rank=1, world=2, device=None)  # process 1 of 2: batch 1
    with pytest.raises(KeyboardInterrupt):  # process 0 of 2: batch 0, then killed before batch 2 is saved
        source._generate_share(rank=0, world=2, device=None)
    assert sorted(p.name for p in source.work.iterdir()) == ["chunk-000000.npy", "chunk-000001.npy"]
    monkeypatch.setattr(GeneratedSource, "_generate", lambda self, chunk: calls.append(chunk) or original(self, chunk))
    store = _source(_data(prompt_text, tmp_path / "two", temperature=1.0), tokenizer, teacher).build()
    assert calls == [1, 0, 2] and _documents(store) == whole


def test_generate_sources_makes_the_store_that_prepare_data_then_reads(prompt_text, tmp_path, tokenizer, teacher,
                                                                       monkeypatch):
    data = _data(prompt_text, tmp_path)
    generator = Teacher(teacher, weights_fingerprint)
    generate_sources(data, tokenizer, generator, tmp_path)  # what lctk distill runs in every process
    monkeypatch.setattr(GeneratedSource, "_generate", lambda self, chunk: pytest.fail("generated twice"))
    rows = prepare_data(data, tokenizer, seed=0, teacher=generator)
    assert rows.summary[0].startswith(f"teacher generations prompted by {prompt_text}: ")


def test_a_damaged_batch_file_is_made_again(prompt_text, tmp_path, tokenizer, teacher):
    source = _source(_data(prompt_text, tmp_path), tokenizer, teacher)
    source.work.mkdir(parents=True)
    (source.work / "chunk-000000.npy").write_bytes(b"\x93NUMPY cut short")
    assert len(source.build()) == 5


def _write(tmp_path, **top):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 1}, **top}))
    return path


@pytest.mark.parametrize("generate, message", [
    ({"tokens": 0}, r"data\.sources\.0\.generate\.tokens: input should be greater than 0"),
    ({"tokens": "1M", "temperature": -1}, r"data\.sources\.0\.generate\.temperature: input should be greater"),
    ({"tokens": "1M", "top_p": 1.5}, r"data\.sources\.0\.generate\.top_p: input should be less than or equal to 1"),
    ({"tokens": "1M", "prompts": "no/such.txt"}, r"data\.sources\.0\.generate\.prompts: 'no/such.txt' is neither"),
    ({"tokens": "1M", "temprature": 0}, r"data\.sources\.0\.generate\.temprature: unknown key \(did you mean "
                                        r"'temperature'\?\)"),
    ({"tokens": "1M", "prompt_tokens": 64}, r"data\.sources\.0\.generate\.prompt_tokens: 64 tokens leave nothing"),
    ({}, r"data\.sources\.0\.generate\.tokens: required key missing"),
])
def test_bad_generate_settings_are_one_line_naming_the_key(tmp_path, generate, message):
    distill = {"teacher": "t", "stages": [{"replace": 1}]}
    recipe = _write(tmp_path, distill=distill, data={"seq_len": 64, "sources": [{"generate": generate}]})
    with pytest.raises(UserError, match=message) as error:
        load_recipe(recipe)
    assert "\n" not in str(error.value)


def test_a_generate_source_needs_a_distill_recipe(tmp_path):
    recipe = _write(tmp_path, model={"pattern": "A"}, data={"sources": [{"generate": {"tokens": 100}}]})
    with pytest.raises(UserError, match=r"^data\.sources\.0\.generate: only a distill recipe has a teacher to generate "
                                        r"from \(this is a train recipe\)$"):
        load_recipe(recipe)
