"""RoPE scaling: frequencies and attention factor against the methods' formulas (written out here) and against
transformers' own initialisers, for lctk and Llama models alike; config round trip in both layouts; bad input."""

import json
import math

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lctk import HybridConfig, HybridForCausalLM
from lctk.errors import UserError
from lctk.extend.rope import legacy_rope_keys, scale_rope, write_legacy_rope_keys

LENGTH, HEAD_DIM, THETA = 64, 16, 10000.0


def hybrid_config() -> HybridConfig:
    return HybridConfig(
        pattern="MA", vocab_size=50, hidden_size=32, num_attention_heads=2, max_position_embeddings=LENGTH,
        mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 16},
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64,
        max_position_embeddings=LENGTH,
    )


def base_frequencies(theta: float = THETA) -> torch.Tensor:
    return theta ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)


def yarn_expected(factor, beta_fast=32.0, beta_slow=1.0):
    w = base_frequencies()

    def dim_of(rotations):  # the dimension pair whose wavelength fits `rotations` times into LENGTH
        return HEAD_DIM * math.log(LENGTH / (2 * math.pi * rotations)) / (2 * math.log(THETA))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), HEAD_DIM - 1)
    ramp = ((torch.arange(HEAD_DIM // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    return w * (1 - ramp) + w / factor * ramp, 0.1 * math.log(factor) + 1


def llama3_expected(factor, low=1.0, high=4.0):
    w = base_frequencies()
    wavelength = 2 * math.pi / w
    smooth = (LENGTH / wavelength - low) / (high - low)
    out = torch.where(wavelength > LENGTH / low, w / factor, (1 - smooth) * w / factor + smooth * w)
    return torch.where(wavelength < LENGTH / high, w, out), 1.0


EXPECTED = {
    "linear": lambda s: (base_frequencies() / s, 1.0),
    "yarn": yarn_expected,
    "llama3": llama3_expected,
    "theta": lambda s: (base_frequencies(THETA * s ** (HEAD_DIM / (HEAD_DIM - 2))), 1.0),
    "dynamic": lambda s: (base_frequencies(), 1.0),  # unchanged up to the original length
}


def rotary_of(model):
    return model.model.rotary_emb


@pytest.mark.parametrize("make_config", [hybrid_config, llama_config], ids=["lctk", "llama"])
@pytest.mark.parametrize("method", sorted(EXPECTED))
@pytest.mark.parametrize("factor", [4, 8])
def test_frequencies_match_formula_and_transformers(make_config, method, factor):
    config = make_config()
    rope = scale_rope(config, method, factor)
    model = (HybridForCausalLM if isinstance(config, HybridConfig) else LlamaForCausalLM)(config)
    rotary = rotary_of(model)
    expected, attention = EXPECTED[method](factor)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(attention)
    if rope["rope_type"] != "default":
        theirs, their_attention = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, None)
        torch.testing.assert_close(rotary.inv_freq, theirs)
        assert rotary.attention_scaling == pytest.approx(their_attention)
    assert config.max_position_embeddings == (LENGTH if method == "dynamic" else LENGTH * factor)
    assert config.lctk_extension["original_max_position_embeddings"] == LENGTH


@pytest.mark.parametrize("factor", [2, 4])
def test_dynamic_ntk_rescales_beyond_the_original_length(factor):
    config = hybrid_config()
    scale_rope(config, "dynamic", factor)
    rotary = rotary_of(HybridForCausalLM(config))
    length = 3 * LENGTH
    rotary(torch.zeros(1, length, 32), torch.arange(length)[None])
    theta = THETA * (factor * length / LENGTH - (factor - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
    torch.testing.assert_close(rotary.inv_freq.double(), base_frequencies(theta), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_lctk_and_llama_rotate_alike(method):
    hybrid, llama = hybrid_config(), llama_config()
    scale_rope(hybrid, method, 4, **({"beta_fast": 16.0, "beta_slow": 2.0} if method == "yarn" else {}))
    scale_rope(llama, method, 4, **({"beta_fast": 16.0, "beta_slow": 2.0} if method == "yarn" else {}))
    positions = torch.arange(5 * LENGTH)[None]
    x = torch.zeros(1, positions.shape[1], 32)
    ours = rotary_of(HybridForCausalLM(hybrid))(x, positions)
    theirs = rotary_of(LlamaForCausalLM(llama))(x, positions)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_yarn_parameters_reach_the_frequencies():
    config = hybrid_config()
    scale_rope(config, "yarn", 4, beta_fast=8.0, beta_slow=2.0, attention_factor=1.5)
    rotary = rotary_of(HybridForCausalLM(config))
    expected, _ = yarn_expected(4, beta_fast=8.0, beta_slow=2.0)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == 1.5


def test_extending_twice_composes_factors():
    config = hybrid_config()
    scale_rope(config, "yarn", 2)
    scale_rope(config, "yarn", 4)
    assert config.rope_parameters["factor"] == 8
    assert config.rope_parameters["original_max_position_embeddings"] == LENGTH
    assert config.max_position_embeddings == 8 * LENGTH
    with pytest.raises(UserError, match="extended with yarn"):
        scale_rope(config, "linear", 2)


def test_llama31_style_scaling_composes_with_the_shipped_factor():
    config = llama_config()
    config.rope_parameters = {
        "rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": LENGTH,
    }
    config.max_position_embeddings = 8 * LENGTH
    scale_rope(config, "llama3", 2)
    assert config.rope_parameters["factor"] == 16 and config.max_position_embeddings == 16 * LENGTH
    with pytest.raises(UserError, match="already uses llama3"):
        scale_rope(llama_config_with_llama3(), "yarn", 2)


def llama_config_with_llama3():
    config = llama_config()
    config.rope_parameters = {**config.rope_parameters, "rope_type": "llama3", "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return config


@pytest.mark.parametrize("make_config", [hybrid_config, llama_config], ids=["lctk", "llama"])
@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_round_trip_in_both_layouts(tmp_path, make_config, method):
    config = make_config()
    rope = scale_rope(config, method, 4)
    config.save_pretrained(tmp_path)
    write_legacy_rope_keys(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == rope["rope_theta"]
    assert saved["rope_scaling"] == (None if method == "theta" else {k: v for k, v in rope.items() if k != "rope_theta"})
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.rope_parameters == rope
    assert loaded.max_position_embeddings == config.max_position_embeddings
    assert loaded.lctk_extension == config.lctk_extension

    # a reader that knows only the older layout, and a config that has only it
    del saved["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == rope


def test_legacy_layout_of_plain_rope_has_no_scaling():
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 5e5}) == {"rope_theta": 5e5, "rope_scaling": None}


@pytest.mark.parametrize(
    ("method", "factor", "params", "message"),
    [
        ("ntk-by-parts", 4, {}, "rope.method: unknown method 'ntk-by-parts'"),
        ("yarn", 0, {}, "rope.factor: must be a positive number"),
        ("yarn", 0.5, {}, "factor: must be >= 1"),
        ("yarn", "4", {}, "factor: must be a positive number"),
        ("linear", 4, {"beta_fast": 32}, "rope.beta_fast: not a parameter of linear"),
        ("yarn", 4, {"beta_fast": 1, "beta_slow": 2}, "rope.beta_fast: must be greater than beta_slow"),
        ("yarn", 4, {"attention_factor": -1}, "rope.attention_factor: must be a positive number"),
        ("llama3", 4, {"low_freq_factor": 4, "high_freq_factor": 1}, "rope.high_freq_factor"),
    ],
)
def test_bad_method_or_parameter_is_one_clear_line(method, factor, params, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")) as error:
        scale_rope(hybrid_config(), method, factor, **params)
    assert "\n" not in str(error.value)
