"""Hold-outs against the reference definitions: Zoology / BASED MQAR, RULER's tasks and scoring, Stuffed Mamba."""

from __future__ import annotations

import random

import numpy as np
import torch

from lctk.evals.tasks import recall


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
