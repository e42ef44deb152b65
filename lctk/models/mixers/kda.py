"""Kimi Delta Attention (`K`), from Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture"
(2025), laid out as fla-org/flash-linear-attention's `fla/layers/kda.py`: Gated DeltaNet (`G`, gated_deltanet.py)
with a decay per key channel instead of per head, and low-rank gates:

    g = -exp(A_log) softplus(W_f2 W_f1 x + dt_bias)    [H, d_k] log-decay, W_f1: hidden -> d_v (the low rank)
    S_t = S_{t-1} Diag(exp(g_t)) (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t q_t / sqrt(d_k)
    out = W_o (RMSNorm(o) * sigmoid(W_g2 W_g1 x + bias))   W_g1: hidden -> d_v, W_g2 with a bias

q/k/v projections, short convolutions, L2 norm, b, padding, documents, decoding and context parallelism are those
of `G`. Defaults are fla's: expand_v 1, head_dim 128, conv 4 without bias, A = U(1, 16) per head, dt_bias = 0 per
channel; fla's 16 heads of 128 at hidden 2048 are num_heads * head_dim = hidden, the rule used at every width
(head_dim 128 where it divides hidden_size, the model's head_dim otherwise). Not offered: fla's num_v_heads,
allow_neg_eigval and the optional lower-bounded gate.

The per-channel decay makes the chunked op's [L, L] factors sums over d_k of per-channel products (the CPU path forms
them as [L, L, d_k] tensors), so `K` costs more per token than `G` at the same state (BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import initialization as init

from lctk.models.layers import init_short_conv
from lctk.models.mixers.gated_deltanet import GatedDeltaNet, fp32_at_least


class KimiDeltaAttention(GatedDeltaNet):
    section = "kda"
    letter_name = "K"
    gate_activation = staticmethod(torch.sigmoid)

    def build_gates(self, hidden_size: int) -> None:
        keys, values = self.num_heads * self.key_dim, self.num_heads * self.value_dim
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, self.value_dim, bias=False),
                                    nn.Linear(self.value_dim, keys, bias=False))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(keys))
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, self.value_dim, bias=False),
                                    nn.Linear(self.value_dim, values, bias=True))

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        head_dim = 128 if config.hidden_size % 128 == 0 else config.head_dim
        return {
            "num_heads": max(1, round(config.hidden_size / head_dim)),
            "head_dim": head_dim,
            "expand_v": 1.0,
            "conv_kernel": 4,
            "chunk_size": 64,
        }

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        init.copy_(self.A_log, torch.empty(self.num_heads).uniform_(1, 16).log())
        init.zeros_(self.dt_bias)
        init_short_conv(self.conv_weight)

    def log_decay(self, hidden_states: Tensor) -> Tensor:
        """g [B, T, H, d_k] fp32: -exp(A_log[h]) softplus(W_f x + dt_bias)."""
        f = (fp32_at_least(self.f_proj(hidden_states)) + self.dt_bias).unflatten(-1, (self.num_heads, self.key_dim))
        return -torch.exp(fp32_at_least(self.A_log)).unsqueeze(-1) * F.softplus(f)
