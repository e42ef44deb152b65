"""Hold-outs against the reference definitions: Zoology / BASED MQAR, RULER's tasks and scoring, Stuffed Mamba."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lctk.tasks import recall


def test_mqar_defaults_follow_zoology_and_based():
    assert [recall.default_pairs(n) for n in (64, 128, 256)] == [4, 8, 16]  # Zoology's Figure 2
    assert [(n, p) for n, p, _ in recall.BASED_TRAIN_MIXTURE] == [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    assert max(p / n for n, p in recall.BASED_TEST) == 0.25 and max(n for n, _ in recall.BASED_TEST) == 1024
    for length, pairs in recall.BASED_TEST:
        sample = recall.make_mqar_sample(length, random.Random(length + pairs), num_kv_pairs=pairs)
        assert (sample.labels != -100).sum() == pairs and sample.input_ids.max() < recall.MQAR_VOCAB


def test_mqar_training_documents_show_the_value_and_eval_samples_do_not():
    shown = recall.make_mqar_sample(128, random.Random(1), value_in_input=True)
    hidden = recall.make_mqar_sample(128, random.Random(1))
    at = np.flatnonzero(hidden.labels != -100)
    assert (shown.input_ids[at] == shown.labels[at]).all()
    assert np.array_equal(shown.labels, hidden.labels) and (hidden.input_ids[at] != hidden.labels[at]).mean() > 0.9


def test_blocks_without_mlp_are_mixer_only():
    from lctk.models import HybridConfig, HybridForCausalLM

    config = HybridConfig(pattern="CBCB", mlp=False, vocab_size=8192, hidden_size=64, num_attention_heads=1)
    model = HybridForCausalLM(config)
    assert all(block.mlp is None for block in model.model.layers)
    assert not any("mlp" in name for name, _ in model.named_parameters())
    assert model(torch.randint(0, 8192, (1, 32))).logits.shape == (1, 32, 8192)


# RULER ---------------------------------------------------------------------------------------------------------------


def test_ruler_scoring_worked_examples():
    from lctk.evals.scoring import string_match_all, string_match_part

    # RULER's constants: string_match_all = share of references found; string_match_part = any reference found
    assert string_match_all("The words are APPLE, pear.", ["apple", "pear", "plum", "fig"]) == 50.0
    assert string_match_part("Denver Broncos", ["Denver Broncos", "The Broncos", "Broncos"]) == 100.0
    assert string_match_part("the Panthers", ["Denver Broncos", "Broncos"]) == 0.0
    assert string_match_part("broncos", ["Denver Broncos", "Broncos"]) == 100.0  # case-insensitive, one is enough


def test_variable_tracking_is_rulers_task(bpe_tokenizer):
    from lctk.tasks import ruler

    sample = ruler.make_sample(bpe_tokenizer, "vt", 1024, random.Random(0))
    assert sample.reserve == 30 and len(sample.input_ids) <= 1024 - 30
    assert len(sample.input_ids) == len(bpe_tokenizer(sample.prompt)["input_ids"])
    names = sample.answers
    assert len(names) == 5 and all(len(n) == 5 and n.isupper() for n in names)
    lines = sample.prompt.split("\n")
    value = next(line for line in lines if line.startswith(f"VAR {names[0]} = ")).split(" = ")[1]
    assert value.isdigit() and len(value) == 5
    for a, b in zip(names, names[1:], strict=False):  # one chain of 4 hops, in order among the noise lines
        assert f"VAR {b} = VAR {a}" in lines
    assert lines.index(f"VAR {names[0]} = {value}") < lines.index(f"VAR {names[-1]} = VAR {names[-2]}")
    assert sample.prompt.count("Memorize and track the chain(s)") == 2  # the one-shot example, then the task
    assert sample.prompt.endswith(f"5 variables are assgined the value {value}, they are: ")
    assert sample.meta["metric"] == "all"


def test_common_words_extraction_counts(bpe_tokenizer):
    import re
    from collections import Counter

    from lctk.tasks import ruler

    sample = ruler.make_sample(bpe_tokenizer, "cwe", 2048, random.Random(1))
    assert sample.reserve == 120 and len(sample.input_ids) <= 2048 - 120
    task = sample.prompt[sample.prompt.rindex("Below is a numbered list"):]
    words = re.findall(r"\d+\. (\S+)", task.split("\nQuestion:")[0])
    counts = Counter(words)
    assert {w for w, c in counts.items() if c == 6} == set(sample.answers) and len(sample.answers) == 10  # < 4K: 6 / 1
    assert all(c == 1 for w, c in counts.items() if w not in sample.answers)
    assert sample.prompt.rstrip().endswith("The top 10 words that appear most often in the list are:")


def test_frequent_words_extraction_follows_zipf(bpe_tokenizer):
    from collections import Counter

    from lctk.tasks import ruler

    sample = ruler.make_sample(bpe_tokenizer, "fwe", 2048, random.Random(2))
    assert sample.reserve == 50 and len(sample.input_ids) <= 2048 - 50
    coded = sample.prompt.split("coded words. ")[1].split("\nQuestion:")[0].split()
    ranked = [w for w, _ in Counter(coded).most_common()]
    assert ranked[0] == "..." and tuple(ranked[1:4]) == sample.answers  # the top "word" is noise
    assert all(len(w) == 6 and w.isalpha() for w in ranked[1:]) and len(set(coded)) <= 2048 // 50


def test_qa_without_data_is_one_line_and_ruler_runs_the_rest(bpe_tokenizer, tmp_path, monkeypatch):
    import socket

    from lctk.tasks import ruler

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    ruler._load_qa.cache_clear()
    with pytest.raises(ruler.QaUnavailable, match=r"^no squad data: pass --qa-data FOLDER"):
        ruler.load_qa("squad", None)
    # local files in RULER's format
    squad = {"data": [{"paragraphs": [
        {"context": "The Broncos won Super Bowl 50 in Santa Clara.", "qas": [
            {"question": "Who won Super Bowl 50?", "answers": [{"text": "Broncos"}, {"text": "Denver Broncos"}],
             "is_impossible": False},
            {"question": "Who lost?", "answers": [], "is_impossible": True}]},
        {"context": "Levi's Stadium is in Santa Clara. " * 3, "qas": []}]}]}
    (tmp_path / "squad.json").write_text(__import__("json").dumps(squad))
    sample = ruler.make_sample(bpe_tokenizer, "qa_1", 512, random.Random(0), qa_data=str(tmp_path))
    assert sample.answers == ("Broncos", "Denver Broncos") and sample.meta["metric"] == "part"
    assert "Document 1:\n" in sample.prompt and "Document 2:\n" in sample.prompt  # both paragraphs fit
    assert sample.prompt.endswith("Question: Who won Super Bowl 50? Answer:") and sample.reserve == 32


def test_haystack_windows_start_anywhere_and_end_at_sentences(bpe_tokenizer):
    from lctk.tasks import niah

    starts = set()
    for index in range(6):
        sample = niah.make_sample(bpe_tokenizer, "niah_single_2", 1024, random.Random(index))
        context = sample.prompt.split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
        assert context.rstrip()[-1] in ".!?" or context.rstrip().endswith(".")  # whole sentences
        starts.add(context[:40])
    assert len(starts) == 6


def test_noise_needles_land_on_random_lines(bpe_tokenizer):
    from lctk.tasks import niah

    lines_at = set()
    for index in range(8):
        sample = niah.make_sample(bpe_tokenizer, "niah_single_1", 2048, random.Random(index))
        lines = sample.prompt.split("\n")
        lines_at.add(next(i for i, line in enumerate(lines) if line.startswith("One of the special magic")))
    assert len(lines_at) >= 6


def test_user_haystack_and_chat_template(bpe_tokenizer, tmp_path):
    from lctk.tasks import niah

    (tmp_path / "essay.txt").write_text("Zebras graze quietly in the morning light. " * 400)
    sample = niah.make_sample(bpe_tokenizer, "niah_single_2", 1024, random.Random(0), haystack=str(tmp_path))
    assert "Zebras graze quietly" in sample.prompt
    chat = ("<user>", "</user><assistant>")
    sample = niah.make_sample(bpe_tokenizer, "niah_single_2", 1024, random.Random(0), chat=chat)
    assert sample.prompt.startswith("<user>A special magic number")
    assert "mentioned in the provided text?</user><assistant>The special magic number for" in sample.prompt


def test_stuffed_mamba_passkey_variant(bpe_tokenizer):
    from lctk.tasks import passkey

    sample = passkey.make_sample(bpe_tokenizer, 1024, 0.5, random.Random(3), variant="passkey_stuffed_mamba")
    (key,) = sample.answers
    assert len(key) == 5 and key.isdigit()
    assert sample.prompt.startswith("There is an important info hidden inside a lot of irrelevant text. Find it and "
                                    "memorize it.\n\nThe grass is green.")
    assert f"\nThe passkey is {key}. Remember it. {key} is the passkey.\n" in sample.prompt
    assert sample.prompt.endswith("There and back again.\n\nWhat is the pass key? The passkey is")
