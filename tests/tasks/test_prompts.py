"""Exact token budgets: every prompt is tokenizer(prompt) exactly, never over the budget, at most a few tokens under,
for byte-level BPE, bytes, Unigram (SentencePiece-style), WordPiece, BPE merging across spaces, and a tokenizer
without offsets."""

import random

import numpy as np
import pytest

from lctk.errors import UserError
from lctk.tasks import niah, passkey, recall

TOKENIZERS = ["bpe_tokenizer", "byte_tokenizer", "unigram_tokenizer", "wordpiece_tokenizer", "spaced_bpe_tokenizer"]
FEW = 3  # "a few tokens under": one haystack token more would overflow the budget


def check_budget(tokenizer, sample, budget):
    """Exactly the prompt's tokens, never over budget, and under it by less than a haystack unit: windows end at a
    whole sentence or line (an eighth of the budget bounds one here)."""
    real = tokenizer(sample.prompt)["input_ids"]
    assert list(sample.input_ids) == list(real), "input_ids must be the tokenisation of the prompt text"
    assert budget - max(FEW, budget // 8) <= len(real) <= budget


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("length", [300, 1000, 3000])
def test_passkey_fits_the_budget_exactly(request, name, length):
    tokenizer = request.getfixturevalue(name)
    for index, depth in enumerate([0.0, 0.3, 1.0]):
        sample = passkey.make_sample(tokenizer, length, depth, random.Random(index), reserve=16)
        check_budget(tokenizer, sample, length - 16)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("task", sorted(niah.RULER_TASKS))
def test_niah_tasks_fit_the_budget_exactly(request, name, task):
    tokenizer = request.getfixturevalue(name)
    length = 3000 if name == "byte_tokenizer" else 1200
    for index in range(2):
        sample = niah.make_sample(tokenizer, task, length, random.Random(index))
        check_budget(tokenizer, sample, length - niah.DEFAULT_RESERVE)
        assert all(answer in sample.prompt for answer in sample.answers)


def test_long_prompts_are_spliced_and_exact(bpe_tokenizer):
    """At 32K tokens the cached haystack path must be the one taken (else it would not be fast), and still exact."""
    for task in ("niah_single_1", "niah_single_2", "niah_multikey_2"):
        sample = niah.make_sample(bpe_tokenizer, task, 32768, random.Random(7), exact=True)
        check_budget(bpe_tokenizer, sample, 32768 - niah.DEFAULT_RESERVE)
        assert sample.meta["method"] == "spliced"


@pytest.mark.parametrize("name", ["bpe_tokenizer", "unigram_tokenizer", "wordpiece_tokenizer", "byte_tokenizer"])
def test_local_tokenizers_take_the_spliced_path(request, name):
    tokenizer = request.getfixturevalue(name)
    sample = niah.make_sample(tokenizer, "niah_single_2", 2000, random.Random(1), exact=True)
    assert sample.meta["method"] == "spliced"


def test_tokenizer_without_offsets_is_tokenised_whole(slow_byte_tokenizer):
    sample = passkey.make_sample(slow_byte_tokenizer, 600, 0.5, random.Random(0))
    check_budget(slow_byte_tokenizer, sample, 600 - 16)
    assert sample.meta["method"] == "whole" and sample.offsets is None


def test_samples_are_deterministic_and_vary_with_the_seed(bpe_tokenizer):
    a = niah.make_sample(bpe_tokenizer, "niah_multikey_1", 1500, random.Random(11))
    b = niah.make_sample(bpe_tokenizer, "niah_multikey_1", 1500, random.Random(11))
    c = niah.make_sample(bpe_tokenizer, "niah_multikey_1", 1500, random.Random(12))
    assert a.prompt == b.prompt and np.array_equal(a.input_ids, b.input_ids)
    assert c.prompt != a.prompt


def test_offsets_map_tokens_to_prompt_characters(unigram_tokenizer):
    sample = niah.make_sample(unigram_tokenizer, "niah_single_2", 1500, random.Random(3))
    whole = unigram_tokenizer(sample.prompt, return_offsets_mapping=True)["offset_mapping"]
    assert np.array_equal(sample.offsets, np.asarray(whole))


def test_budget_too_small_is_a_user_error(bpe_tokenizer):
    with pytest.raises(UserError, match="too short for niah_multiquery"):
        niah.make_sample(bpe_tokenizer, "niah_multiquery", 120, random.Random(0))


def test_text_recall_fits_exactly_and_locates_the_values(bpe_tokenizer):
    sample = recall.make_text_recall_sample(bpe_tokenizer, 700, random.Random(0))
    check_budget(bpe_tokenizer, sample, 700)
    assert len(sample.answers) == recall.DEFAULT_QUERIES and sample.meta["pairs"] > 2 * recall.DEFAULT_QUERIES
    for value, positions in zip(sample.answers, recall.value_token_positions(sample), strict=True):
        assert bpe_tokenizer.decode(sample.input_ids[positions]).strip().rstrip(".") == value
        assert f": {value}.\n" in sample.prompt.split(recall.TEXT_QUESTION)[0] + "\n"  # listed before the queries


def test_mqar_layout():
    vocab, length = 512, 256
    sample = recall.make_mqar_sample(length, random.Random(0), vocab_size=vocab)
    pairs = sample.num_kv_pairs
    assert pairs == length // 16 == recall.default_pairs(length) and len(sample.input_ids) == length  # Zoology's
    keys, values = sample.input_ids[0 : 2 * pairs : 2], sample.input_ids[1 : 2 * pairs : 2]
    assert ((keys >= 1) & (keys < vocab // 2)).all() and ((values >= vocab // 2) & (values < vocab)).all()
    assert len(set(keys.tolist())) == pairs
    targets = np.flatnonzero(sample.labels != -100)
    assert len(targets) == pairs and (targets >= 2 * pairs).all()
    truth = dict(zip(keys.tolist(), values.tolist(), strict=True))
    for t in targets:  # the label after each queried key is its value
        assert sample.labels[t] == truth[int(sample.input_ids[t - 1])]
    # as Zoology (random_non_queries): a random id follows the query, the value is not shown again
    assert (sample.input_ids[targets] != sample.labels[targets]).mean() > 0.9
    gaps = np.sort(targets - 2 * pairs)
    assert np.median(gaps) < (length - 2 * pairs) / 2  # power law: queries come early more often than not
