"""Gated DeltaNet (`G`), from Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025; NVlabs/GatedDeltaNet), laid out as fla-org/flash-linear-attention's `fla/layers/gated_deltanet.py`:

    q, k = W_q x, W_k x                              H heads of head_dim d_k
    v = W_v x                                        H heads of d_v = expand_v * d_k
    q, k, v = silu(causal_depthwise_conv([q, k, v]))  kernel 4, per channel, no bias
    q, k = q / ||q||, k / ||k||                     L2 norm per head (x / sqrt(sum x^2 + 1e-6), as fla)
    b = sigmoid(W_b x),  g = -exp(A_log) softplus(W_a x + dt_bias)      per head: write strength, log-decay
    S_t = S_{t-1} exp(g_t) (I - b_t k_t k_t^T) + b_t v_t k_t^T,   o_t = S_t q_t / sqrt(d_k)     state [d_v, d_k]
    out = W_o (RMSNorm(o) * silu(W_gate x))          norm per head (one weight of d_v), then the gate

The recurrence is `lctk.kernels.delta` (its state is the transpose, [d_k, d_v]). Defaults are fla's: expand_v 2,
head_dim 256, conv 4 without bias, output gate on, A = U(0, 16), dt_bias = softplus^-1(dt) with dt log-uniform in
[0.001, 0.1] (floored at 1e-4), norm eps = rms_norm_eps (1e-5). fla sizes the heads for hidden 2048 (6 heads of 256:
num_heads * head_dim = 0.75 hidden, about 6 hidden^2 parameters); here head_dim is 256 where 0.75 hidden is a
multiple of 256 and the model's head_dim otherwise, and num_heads = round(0.75 hidden / head_dim) (at least 1), the
same rule at every width. Not offered: fla's num_v_heads > num_heads (grouped values) and allow_neg_eigval.

Padding tokens get b = 0, g = 0 and zero conv inputs, so they leave the state as it is. Packed documents: the conv
and the recurrence restart at each boundary (the op's cu_seqlens). Decoding runs one step of the recurrence on the
cached state, in place. Rows split across processes (lctk.parallel.context): the convolution takes the previous
shard's last K - 1 inputs; the recurrence is affine in the carried state, S_out = M S_in + F per shard, so each
shard runs from a zero state with K extra value columns that start as the identity (they carry M, and the outputs'
readout q_t^T M_t) and the earlier shards' (F, M) come from one gather and a scan (`delta_rows`): O(H d_k (d_k + d_v))
bytes per layer whatever T, for about (d_v + d_k) / d_v times the recurrence's work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from lctk.kernels.delta import delta_rule, delta_step
from lctk.models.layers import init_short_conv, short_conv
from lctk.models.mixers.base import Mixer, MixerState, short_shard
from lctk.models.sequence import SequenceInfo


@dataclass
class DeltaState(MixerState):
    conv: Tensor  # [B, conv_kernel - 1, 2 H d_k + H d_v] the last inputs of the convolution
    recurrent: Tensor  # [B, H, d_k, d_v] fp32


class GatedHeadRMSNorm(nn.Module):
    """RMSNorm over each head's d_v channels (one weight shared by the heads), then times act(gate): fla's
    FusedRMSNormGated (norm before gate; silu for Gated DeltaNet, sigmoid for KDA)."""

    def __init__(self, dim: int, eps: float, activation):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.activation = eps, activation

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        """x, gate [..., H, d_v]."""
        wide = fp32_at_least(x)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed * self.activation(fp32_at_least(gate))).to(x.dtype)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    wide = fp32_at_least(x)
    return (wide * torch.rsqrt(wide.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def fp32_at_least(x: Tensor) -> Tensor:
    """Norms and gates run in fp32 (in fp64 for an fp64 model, so that its results do not stop at fp32 rounding)."""
    return x if x.dtype == torch.float64 else x.float()


class GatedDeltaNet(Mixer):
    section = "gated_deltanet"
    letter_name = "G"  # for messages of classmethods, which have no instance letter
    gate_activation = staticmethod(F.silu)

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.num_heads, self.key_dim = s["num_heads"], s["head_dim"]
        self.value_dim = round(s["expand_v"] * self.key_dim)
        self.conv_kernel, self.chunk_size = s["conv_kernel"], s["chunk_size"]
        keys, values = self.num_heads * self.key_dim, self.num_heads * self.value_dim
        self.conv_split = [keys, keys, values]
        self.q_proj = nn.Linear(config.hidden_size, keys, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, keys, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, values, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(sum(self.conv_split), self.conv_kernel))
        self.build_gates(config.hidden_size)
        self.o_norm = GatedHeadRMSNorm(self.value_dim, config.rms_norm_eps, self.gate_activation)
        self.o_proj = nn.Linear(values, config.hidden_size, bias=False)
        self.init_special_parameters()

    def build_gates(self, hidden_size: int) -> None:
        """The decay's projection and parameters, and the output gate's projection."""
        self.a_proj = nn.Linear(hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.g_proj = nn.Linear(hidden_size, self.num_heads * self.value_dim, bias=False)

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        budget = 0.75 * config.hidden_size
        head_dim = 256 if budget % 256 == 0 else config.head_dim
        return {
            "num_heads": max(1, round(budget / head_dim)),
            "head_dim": head_dim,
            "expand_v": 2.0,
            "conv_kernel": 4,
            "chunk_size": 64,
        }

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        value_dim = settings["expand_v"] * settings["head_dim"]
        if value_dim != round(value_dim):
            raise ValueError(
                f"{cls.section}.expand_v: {settings['expand_v']} * head_dim {settings['head_dim']} is not a whole "
                "number of value channels"
            )
        if settings["conv_kernel"] < 2:
            raise ValueError(f"{cls.section}.conv_kernel: must be at least 2, got {settings['conv_kernel']}")

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        kernel = getattr(config, cls.section)["conv_kernel"]
        return short_shard(cls.letter_name, kernel - 1, f"{cls.section}.conv_kernel - 1", shard_length)

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        dt_min, dt_max, dt_floor = 0.001, 0.1, 1e-4  # fla's, fixed there too
        log_dt = torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = log_dt.exp().clamp(min=dt_floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.copy_(self.A_log, torch.empty(self.num_heads).uniform_(0, 16).log())
        init_short_conv(self.conv_weight)

    def log_decay(self, hidden_states: Tensor) -> Tensor:
        """g [B, T, H] fp32: -exp(A_log) softplus(W_a x + dt_bias)."""
        a = fp32_at_least(self.a_proj(hidden_states)) + self.dt_bias
        return -torch.exp(fp32_at_least(self.A_log)) * F.softplus(a)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> DeltaState:
        return DeltaState(
            conv=torch.zeros(batch_size, self.conv_kernel - 1, sum(self.conv_split), device=device, dtype=dtype),
            recurrent=torch.zeros(batch_size, self.num_heads, self.key_dim, self.value_dim, device=device),
        )

    def state_size(self, seq_len: int) -> int:
        return (self.conv_kernel - 1) * sum(self.conv_split) + self.num_heads * self.key_dim * self.value_dim

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: DeltaState | None = None) -> Tensor:
        length = hidden_states.shape[1]
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1)
        beta = torch.sigmoid(fp32_at_least(self.b_proj(hidden_states)))  # [B, T, H]
        g = self.log_decay(hidden_states)  # [B, T, H] or [B, T, H, d_k]
        if seq.token_mask is not None:  # padding: no write, no decay (and no conv input: short_conv)
            real = seq.token_mask.unsqueeze(-1)
            beta = beta * real
            g = g * (real if g.dim() == 3 else real.unsqueeze(-1))

        convolved = short_conv(qkv, self.conv_weight, None, seq, state, tag=f"{self.letter} conv")
        q, k, v = convolved.split(self.conv_split, dim=-1)
        q = l2_normalize(q.unflatten(-1, (self.num_heads, self.key_dim)))
        k = l2_normalize(k.unflatten(-1, (self.num_heads, self.key_dim)))
        v = v.unflatten(-1, (self.num_heads, self.value_dim))
        scale = self.key_dim**-0.5

        if state is not None and length == 1 and not seq.has_documents:
            o = delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.recurrent, scale=scale).unsqueeze(1)
        else:
            initial = None if state is None else state.recurrent
            o, final = delta_rows(q, k, v, g, beta, seq, initial, self.chunk_size, scale, f"{self.letter} state")
            if state is not None:
                state.recurrent.copy_(final)
        gate = self.g_proj(hidden_states).unflatten(-1, (self.num_heads, self.value_dim))
        return self.o_proj(self.o_norm(o, gate).flatten(-2))


def delta_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    seq: SequenceInfo,
    initial: Tensor | None,
    chunk_size: int,
    scale: float,
    tag: str,
) -> tuple[Tensor, Tensor | None]:
    """`delta_rule` over the rows of one forward call; packed documents run as one flat row restarting at each
    boundary. initial: the per-row state [B, H, d_k, d_v] to continue, or None (then no final state is returned).
    A shard of split rows runs from a zero state, with d_k more value columns that start as the identity, and gets
    the earlier shards' state from the group (ContextShard.carry_affine_states)."""
    if seq.shard is not None:
        batch, _, heads, key_dim = k.shape
        value_dim = v.shape[-1]
        eye = torch.eye(key_dim, device=v.device).expand(batch, heads, key_dim, key_dim)
        start = torch.cat([v.new_zeros(batch, heads, key_dim, value_dim, dtype=torch.float32), eye], dim=-1)
        wide = torch.cat([v, v.new_zeros(*v.shape[:3], key_dim)], dim=-1)
        out, final = delta_rows(q, k, wide, g, beta, replace(seq, shard=None), start, chunk_size, scale, tag)
        out, readout = out.split([value_dim, key_dim], dim=-1)  # readout_t = scale * q_t^T M_t
        final, transition = final.split([value_dim, key_dim], dim=-1)  # F, M: S_end = M S_in + F
        return seq.shard.carry_affine_states(out, readout, final, transition, seq.seq_idx, tag), None
    want_final = initial is not None
    if not seq.has_documents:
        return delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial, output_final_state=want_final,
                          chunk_size=chunk_size)
    flat = [t.flatten(0, 1).unsqueeze(0) for t in (q, k, v, g, beta)]
    out, final = delta_rule(*flat, scale=scale, initial_state=seq.flat_initial_states(initial),
                            output_final_state=want_final, cu_seqlens=seq.cu_seqlens, chunk_size=chunk_size)
    return out.view(v.shape), seq.row_final_states(final) if want_final else None
