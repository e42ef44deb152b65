"""Synthetic tasks: documents built from the eval generators, trained on the right tokens, within their lengths."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lctk.data.packing import TaskRows
from lctk.data.tasks import Task, check_task
from lctk.data.tokenizer import build_tokenizer
from lctk.errors import UserError
from lctk.labels import IGNORE


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("bytes", None, None)


@pytest.mark.parametrize("loss", ["all", "answer"])
def test_passkey_documents_end_with_the_answer_and_end_of_text(tokenizer, loss):
    task = Task("passkey", {"loss": loss, "min_length": 400}, tokenizer, seq_len=512, key="data.sources.1")
    document = task.document(random.Random(3), 450)
    text = tokenizer.decode(document.ids[:-1])
    assert len(document.ids) <= 450 and document.ids[-1] == tokenizer.eos_token_id
    key = text.rsplit("The pass key is", 1)[1].strip(" .")
    assert key.isdigit() and len(key) == 5 and text.count(key) == 3  # needle twice, answer once
    trained_text = tokenizer.decode(document.ids[document.trained])
    if loss == "answer":
        assert trained_text == f" {key}.<|endoftext|>"
    else:
        assert document.trained.all()


def test_niah_documents_answer_the_question(tokenizer):
    task = Task("niah", {"loss": "answer", "tasks": ["niah_single_1"], "min_length": 600}, tokenizer, 1024, key="k")
    document = task.document(random.Random(0), 900)
    prompt = tokenizer.decode(document.ids[~document.trained])
    answer = tokenizer.decode(document.ids[document.trained]).removesuffix("<|endoftext|>").strip(" .")
    assert f"is: {answer}." in prompt


def test_rows_of_text_tasks_pad_what_no_document_fits(tokenizer):
    task = Task("passkey", {"min_length": 300}, tokenizer, seq_len=512, key="k")
    row = TaskRows(task, 512, seed=0, salt=1, pad_id=tokenizer.eos_token_id).row(0)
    assert len(row.input_ids) == 512
    starts = np.flatnonzero(row.position_ids == 0)
    assert starts[0] == 0 and (row.labels[starts] == IGNORE).all()
    if len(starts) > 1:  # padding after the last document is never a target
        assert (row.labels[starts[-1] :] == IGNORE).all() or row.input_ids[starts[-1]] != tokenizer.eos_token_id


def test_lengths_too_short_for_the_prompt_name_the_option(tokenizer):
    with pytest.raises(UserError, match=r"^data.sources.3.options.min_length: 64 tokens are too few for a passkey"):
        Task("passkey", {"min_length": 64}, tokenizer, seq_len=512, key="data.sources.3")


def test_option_errors_name_the_option():
    with pytest.raises(ValueError, match=r"^options.num_kv_pair: unknown key \(did you mean 'num_kv_pairs'\?\)"):
        check_task("mqar", {"num_kv_pair": 4})
    with pytest.raises(ValueError, match=r"^options.tasks: unknown NIAH task 'niah_single'"):
        check_task("niah", {"tasks": ["niah_single"]})


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("copy", {"min_length": 40, "max_length": 10}, r"^options.min_length: 40 is more than max_length 10"),
        ("mqar", {"power_a": float("inf")}, r"^options.power_a: input should be a finite number"),
        ("mqar", {"power_a": float("nan")}, r"^options.power_a: input should be a finite number"),
        ("passkey", {"max_length": 0}, r"^options.max_length: input should be greater than 1"),
    ],
)
def test_nonsense_options_are_refused_not_clamped(name, options, expected):
    with pytest.raises(ValueError, match=expected):
        check_task(name, options)


def test_a_vocabulary_beyond_the_tokenizer_is_refused(tokenizer):
    with pytest.raises(UserError, match=r"^data.sources.1.options.vocab_size: 1000 is more than the tokenizer's 257"):
        Task("copy", {"vocab_size": 1000}, tokenizer, seq_len=64, key="data.sources.1")
