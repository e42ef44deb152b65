"""BASED (`B`): the Taylor feature map and the layer against a quadratic-time reference written here."""

import math

import torch

from lctk import HybridConfig
from lctk.models.mixers.based import Based, taylor_features
from lctk.models.sequence import build_sequence_info


def test_taylor_features_give_the_second_order_exponential():
    torch.manual_seed(0)
    q, k = torch.randn(2, 5, 16, dtype=torch.float64).unbind(0)
    phi_q, phi_k = taylor_features(q), taylor_features(k)
    assert phi_q.shape == (5, 273)
    x = (q * k).sum(-1) / math.sqrt(16)
    assert torch.allclose((phi_q * phi_k).sum(-1), 1 + x + x**2 / 2)


def test_layer_matches_normalised_quadratic_attention():
    torch.manual_seed(0)
    config = HybridConfig(
        pattern="B", hidden_size=24, num_attention_heads=3, based={"feature_dim": 4, "chunk_size": 8}
    )
    mixer = Based(config, "B").double()
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    out = mixer(x, build_sequence_info(2, 19, 0, x.device))

    q = mixer.q_proj(x).unflatten(-1, (3, 4))
    k = mixer.k_proj(x).unflatten(-1, (3, 4))
    v = mixer.v_proj(x).unflatten(-1, (3, 8))
    dot = torch.einsum("bthf,bshf->bhts", q, k) / 2  # sqrt(feature_dim)
    weights = (1 + dot + dot**2 / 2) * torch.ones(19, 19, dtype=torch.bool).tril()
    y = torch.einsum("bhts,bshv->bthv", weights, v) / weights.sum(-1).transpose(1, 2).unsqueeze(-1)
    expected = mixer.o_proj(y.flatten(-2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # the ssd op works in fp32


def test_state_holds_the_sums_and_matches_state_size():
    torch.manual_seed(0)
    config = HybridConfig(pattern="B", hidden_size=32, num_attention_heads=2)
    mixer = Based(config, "B")
    x = torch.randn(1, 9, 32)
    state = mixer.init_state(1, x.device, x.dtype)
    with torch.no_grad():
        mixer(x, build_sequence_info(1, 9, 0, x.device), state)
        phi_k = taylor_features(mixer.k_proj(x).unflatten(-1, (2, 16)))
    assert state.kv.shape == (1, 2, 273, 17)  # feature dim 16 -> 273 features; 16 value channels + normaliser
    assert torch.allclose(state.kv[..., -1], phi_k.sum(1), rtol=1e-5)
    assert mixer.state_size(10) == mixer.state_size(10_000) == 2 * 273 * 17
