"""Weight decay exclusions and learning-rate schedules against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from lctk.models import HybridConfig, HybridForCausalLM
from lctk.recipe import TrainSection
from lctk.train.optim import lr_factor, param_groups


def tiny_model() -> HybridForCausalLM:
    config = HybridConfig(
        pattern="MA", vocab_size=64, hidden_size=32, num_attention_heads=2,
        attention={"qkv_bias": True}, mamba2={"state_size": 8, "head_dim": 16},
    )
    return HybridForCausalLM(config)


def test_norms_biases_and_ssm_parameters_are_not_decayed():
    model = tiny_model()
    model.model.layers[1].mlp.up_proj.weight._no_weight_decay = True  # a mixer may mark any parameter
    decayed, kept = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert kept["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    for suffix in ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.conv_bias", "mixer.norm.weight",
                   "mixer_norm.weight", "q_proj.bias", "model.norm.weight", "layers.1.mlp.up_proj.weight"):
        assert any(n.endswith(suffix) for n in kept_names), suffix
    for suffix in ("embed_tokens.weight", "mixer.in_proj.weight", "mixer.conv_weight", "q_proj.weight", "down_proj.weight"):
        assert any(n.endswith(suffix) for n in decayed_names), suffix
    assert not kept_names & decayed_names
    assert len(kept_names | decayed_names) == len(list(model.parameters()))


def section(**values) -> TrainSection:
    return TrainSection(steps=100, lr=1.0, **values)


def test_warmup_then_cosine_to_the_floor():
    train = section(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, train) == pytest.approx(0.1)
    assert lr_factor(9, 100, train) == pytest.approx(1.0)
    assert lr_factor(10, 100, train) == pytest.approx(1.0)
    assert lr_factor(55, 100, train) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, train) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [("linear", 50, 1 - 0.9 * 0.5), ("constant", 80, 1.0), ("wsd", 70, 1.0), ("wsd", 90, 1 - 0.9 * 0.5)],
)
def test_other_schedules(schedule, step, expected):
    train = section(schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_factor(step, 100, train) == pytest.approx(expected)


def test_optimizer_steps_only_trainable_parameters():
    model = tiny_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model, 0.1)
    trainable = [p for g in groups for p in g["params"]]
    assert all(p.requires_grad for p in trainable)
    assert not any(p is model.model.embed_tokens.weight for p in trainable)
    assert isinstance(trainable[0], torch.nn.Parameter)
