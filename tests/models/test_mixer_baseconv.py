"""BaseConv (`C`): the gated short convolution against torch's conv1d, and its shapes."""

import torch
import torch.nn.functional as F

from lctk import HybridConfig
from lctk.models.mixers.baseconv import BaseConv
from lctk.models.sequence import build_sequence_info


def test_layer_matches_a_conv1d_reference():
    torch.manual_seed(0)
    config = HybridConfig(pattern="C", hidden_size=16, num_attention_heads=2)
    mixer = BaseConv(config, "C").double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    out = mixer(x, build_sequence_info(2, 11, 0, x.device))

    assert mixer.in_proj.weight.shape == (64, 16) and mixer.conv_weight.shape == (32, 3)  # d -> 4d, kernel 3
    u, z = mixer.in_proj(x).split(32, dim=-1)
    conv = F.conv1d(u.transpose(1, 2), mixer.conv_weight.unsqueeze(1), mixer.conv_bias, padding=2, groups=32)
    expected = mixer.out_proj(F.silu(conv[..., :11].transpose(1, 2)) * z)
    assert torch.allclose(out, expected, atol=1e-12)


def test_state_is_the_last_inputs():
    config = HybridConfig(pattern="C", hidden_size=16, num_attention_heads=2, baseconv={"conv_kernel": 4})
    mixer = BaseConv(config, "C")
    x = torch.randn(3, 7, 16)
    state = mixer.init_state(3, x.device, x.dtype)
    with torch.no_grad():
        mixer(x, build_sequence_info(3, 7, 0, x.device), state)
        u = mixer.in_proj(x)[..., :32]
    assert torch.equal(state.conv, u[:, -3:])
    assert mixer.state_size(5) == mixer.state_size(5000) == 3 * 32
