"""Prompt texts exactly as specified (passkey: the classic format; NIAH: RULER's template, needle and singular form)."""

import random
import re

import pytest

from lctk.evals.scoring import string_match_all
from lctk.tasks import niah, passkey

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_is_the_classic_format(bpe_tokenizer, depth):
    sample = passkey.make_sample(bpe_tokenizer, 400, depth, random.Random(3))
    key = sample.answers[0]
    assert re.fullmatch(r"[1-9]\d{4}", key) and sample.target == f" {key}."
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    lines = sample.prompt.split("\n")
    assert lines[0] == TASK
    assert lines[-1] == "What is the pass key? The pass key is"
    assert lines.count(needle) == 1
    garbage = [line for line in lines[1:-1] if line != needle]
    assert garbage, "the filler must fill the budget"
    for line in garbage:  # the filler repeated with single spaces, cut only between sentences or at the far end
        assert line in " ".join([FILLER] * 200) and line.startswith("The ")
    at = lines.index(needle)
    assert at == {0.0: 1, 1.0: len(lines) - 2}.get(depth, at)
    if depth == 0.5:
        before, after = len(lines[1]), len(lines[3])
        assert 1 < at < len(lines) - 2 and abs(before - after) < 0.2 * (before + after)


def test_niah_single_value_uses_the_singular_template(bpe_tokenizer):
    sample = niah.make_sample(bpe_tokenizer, "niah_single_2", 600, random.Random(0))
    (key,), (value,) = sample.meta["keys"], sample.answers
    assert re.fullmatch(r"\d{7}", value)
    assert sample.prompt.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\n"
    )
    assert sample.prompt.endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    assert sample.prompt.count(f"One of the special magic numbers for {key} is: {value}.") == 1
    assert sample.target == f" {value}."


def test_niah_multiquery_uses_the_plural_template_and_lists_keys(bpe_tokenizer):
    sample = niah.make_sample(bpe_tokenizer, "niah_multiquery", 900, random.Random(1))
    keys = sample.meta["keys"]
    assert len(keys) == 4 and len(sample.answers) == 4
    query = f"{keys[0]}, {keys[1]}, {keys[2]}, and {keys[3]}"
    assert sample.prompt.startswith(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n"
    )
    assert sample.prompt.endswith(
        f"\nWhat are all the special magic numbers for {query} mentioned in the provided text? "
        f"The special magic numbers for {query} mentioned in the provided text are"
    )
    for key, value in zip(keys, sample.answers, strict=True):
        assert f"One of the special magic numbers for {key} is: {value}." in sample.prompt


def test_niah_multivalue_hides_four_values_for_one_key(bpe_tokenizer):
    sample = niah.make_sample(bpe_tokenizer, "niah_multivalue", 900, random.Random(2))
    (key,) = sample.meta["keys"]
    found = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d{{7}})\.", sample.prompt)
    assert sorted(found) == sorted(sample.answers) and len(found) == 4
    assert "What are all the special magic numbers for" in sample.prompt


def test_niah_uuid_values_and_distractor_haystack(bpe_tokenizer):
    sample = niah.make_sample(bpe_tokenizer, "niah_multikey_3", 1500, random.Random(4))
    (key,), (value,) = sample.meta["keys"], sample.answers
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, key) and re.fullmatch(uuid, value)
    assert "A special magic uuid is hidden" in sample.prompt
    needles = re.findall(rf"One of the special magic uuids for ({uuid}) is: ({uuid})\.", sample.prompt)
    assert len(needles) > 5 and [k for k, _ in needles].count(key) == 1  # distractors, one true needle


def test_noise_haystack_is_the_repeated_paragraph_one_per_line(bpe_tokenizer):
    sample = niah.make_sample(bpe_tokenizer, "niah_single_1", 500, random.Random(5))
    context = sample.prompt.split("\n")[1:-1]
    needle = [line for line in context if line.startswith("One of the special magic")]
    assert len(needle) == 1
    assert all(line == FILLER or FILLER.startswith(line) for line in context if line not in needle)


def test_grid_places_the_needle_at_the_asked_depth(bpe_tokenizer):
    start = niah.make_sample(bpe_tokenizer, "niah_grid", 800, random.Random(6), depth=0.0)
    end = niah.make_sample(bpe_tokenizer, "niah_grid", 800, random.Random(6), depth=1.0)
    assert start.prompt.split("\n")[1].startswith("One of the special magic numbers for")
    assert end.prompt.split("\n")[-2].endswith(f"is: {end.answers[0]}.")
    with pytest.raises(ValueError, match="several needles"):
        niah.make_sample(bpe_tokenizer, "niah_multivalue", 800, random.Random(6), depth=0.5)


def test_string_match_all_is_the_share_of_answers_found():
    assert string_match_all(" 12345.", ("12345",)) == 100.0
    assert string_match_all("nothing", ("12345",)) == 0.0
    assert string_match_all("A-B and 7", ("a-b", "7", "8", "9")) == 50.0
    with pytest.raises(ValueError):
        string_match_all("x", ())
