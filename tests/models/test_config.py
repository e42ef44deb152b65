"""HybridConfig validation: every setting is checked by kind, and any config either builds a model that runs or
raises one ValueError naming its field."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lctk import HybridConfig, HybridForCausalLM
from lctk.models.mixers import MIXERS, section_of
from lctk.models.modeling import parameter_count

SMALL = dict(vocab_size=64, hidden_size=32, num_attention_heads=2)
FIELDS = set(HybridConfig.__annotations__)


def _sized_settings():
    """(letter, key) for every mixer setting whose default is a number (a size, count or scale)."""
    config = HybridConfig(pattern="".join(sorted(set(MIXERS))), **SMALL)
    for letter in sorted(set(MIXERS) - {"S"}):  # S shares A's section
        mixer = MIXERS[letter]
        for key, default in mixer.default_settings(config).items():
            numeric = isinstance(default, int | float) and not isinstance(default, bool)
            if numeric and key not in mixer.special_settings:
                yield letter, key


@pytest.mark.parametrize(("letter", "key"), list(_sized_settings()))
@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, "4", True])
def test_every_numeric_mixer_setting_rejects_zero_negative_and_non_numbers(letter, key, value):
    section = section_of(letter)
    with pytest.raises(ValueError, match=rf"^{section}\.{key}: must be a positive"):
        HybridConfig(pattern=letter, **SMALL, **{section: {key: value}})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_key_value_heads": 0}, "num_key_value_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 15}, "head_dim"),  # rotary embeddings need pairs of dimensions
        ({"intermediate_size": -1}, "intermediate_size"),
        ({"initializer_range": -0.02}, "initializer_range"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
        ({"hidden_size": True}, "hidden_size"),
        ({"rope_theta": -1.0}, "rope_parameters.rope_theta"),
        ({"pad_token_id": 64}, "pad_token_id"),
        ({"attention": {"qkv_bias": "yes"}}, "attention.qkv_bias"),
        ({"attention": {"backend": 3}}, "attention.backend"),
        ({"pattern": "T", "titans": {"max_inner_lr": math.inf}}, "titans.max_inner_lr"),  # settings defaulting to null
        ({"mamba2": {"xb_heads": 0}}, "mamba2.xb_heads"),
        ({"rope_parameters": {"rope_type": "fancy", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "rope_parameters.factor"),
        ({"rope_parameters": "yarn"}, "rope_parameters"),
    ],
)
def test_nonsense_values_name_their_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: "):
        HybridConfig(**{**SMALL, "pattern": "MA", **overrides})


def test_an_odd_head_dim_is_fine_without_rotary_layers():
    assert HybridConfig(pattern="MBC", **SMALL, head_dim=15).head_dim == 15


def test_parameter_count_counts_without_allocating():
    config = HybridConfig(pattern="MASBCTL", **SMALL)
    assert parameter_count(config) == sum(p.numel() for p in HybridForCausalLM(config).parameters())
    assert parameter_count(HybridConfig(pattern="MA", vocab_size=64, hidden_size=10**7, num_attention_heads=2)) > 10**15


# --- random configs: a model that runs, or one ValueError naming a field ----------------------------------------

junk = st.sampled_from([0, -1, 0.5, math.nan, math.inf, True, None, "", "AX", [2]])
numbers = st.one_of(st.integers(-1, 8), junk)


@st.composite
def mostly(draw, valid):
    """A value from `valid` seven times in eight, else junk: many examples get past validation to the model."""
    return draw(numbers if draw(st.integers(0, 7)) == 7 else valid)


@st.composite
def config_dicts(draw):
    letters = "".join(MIXERS)
    kwargs = {"pattern": draw(mostly(st.text(letters, min_size=1, max_size=3)))}
    for name, valid in [
        ("vocab_size", st.sampled_from([8, 64])),
        ("hidden_size", st.sampled_from([16, 24, 32])),
        ("num_attention_heads", st.sampled_from([1, 2, 4])),
        ("num_key_value_heads", st.sampled_from([1, 2, 3])),
        ("head_dim", st.sampled_from([4, 7, 8, 16])),
        ("intermediate_size", st.sampled_from([16, 48])),
        ("max_position_embeddings", st.sampled_from([4, 64])),
        ("rms_norm_eps", st.floats(1e-6, 1e-2)),
        ("initializer_range", st.floats(1e-3, 0.1)),
        ("rope_theta", st.floats(1, 1e6)),
        ("pad_token_id", st.integers(0, 63)),
        ("rope_parameters", st.fixed_dictionaries(
            {"rope_type": st.sampled_from(["default", "linear", "yarn", "dynamic", "fancy"]), "rope_theta": st.just(1e4)},
            optional={"factor": mostly(st.floats(1, 8))},
        )),
    ]:
        if draw(st.booleans()):
            kwargs[name] = draw(mostly(valid))
    probe = HybridConfig(pattern="".join(sorted(set(MIXERS))), **SMALL)
    for letter in draw(st.lists(st.sampled_from(sorted(set(MIXERS) - {"S"})), max_size=2, unique=True)):
        section = section_of(letter)
        keys = st.sampled_from(sorted(getattr(probe, section)))
        kwargs[section] = draw(st.dictionaries(keys, mostly(st.integers(1, 8) | st.floats(0.01, 4)), max_size=3))
    return kwargs


@settings(max_examples=120, deadline=None)
@given(config_dicts())
def test_random_configs_build_a_running_model_or_name_a_field(kwargs):
    try:
        config = HybridConfig(**kwargs)
    except ValueError as error:
        field = re.match(r"^(\w+)[.\[:]", str(error))
        assert field and field.group(1) in FIELDS, str(error)
        return
    torch.manual_seed(0)
    model = HybridForCausalLM(config)
    ids = torch.arange(5).unsqueeze(0) % config.vocab_size
    assert model(ids).logits.shape == (1, 5, config.vocab_size)
