"""Mamba-2 mixer (`M`), from Dao & Gu, "Transformers are SSMs" (2024), the SSD layer:

    z, x, B, C, dt = in_proj(u)                       x: H heads of P channels; B, C: G groups of N states
    x, B, C = silu(causal_conv1d([x, B, C]))          depthwise, kernel K, per channel
    dt = softplus(dt + dt_bias),  A = -exp(A_log)     one scalar decay per head
    h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t^T        state [N, P] per head (head h reads group h // (H / G))
    y_t = C_t^T h_t + D x_t
    out = out_proj(RMSNorm(y * silu(z)))              norm per group (norm_before_gate = False)

The recurrence is `lctk.kernels.ssd.ssd` with q = C, k = B, v = x * dt, g = A * dt. Initialisation as the paper's
reference code: dt_bias = softplus^-1(dt0) with dt0 log-uniform in [dt_min, dt_max] (floored at dt_init_floor),
A_log = log(U[1, 16]), D = 1. Padding tokens get dt = 0 and zero conv input, so they leave the state untouched.

`xb_heads` (default: off) shares x and B across heads the way grouped-query attention shares V and K: in_proj makes
xb_heads heads of x and xb_heads groups of B, repeated up to H heads and G groups after the convolution. This is the
shape an attention layer maps onto (Mamba-in-Llama / Apriel-H1 initialisation: V -> x, K -> B, Q -> C, O -> out_proj
with n_groups = query heads, xb_heads = kv heads, state_size = head_dim = attention head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from lctk.kernels.ssd import ssd, ssd_step
from lctk.models.layers import GatedRMSNorm, causal_depthwise_conv, conv_tail
from lctk.models.mixers.base import Mixer, MixerState, require_positive_int
from lctk.models.sequence import SequenceInfo


@dataclass
class Mamba2State(MixerState):
    conv: Tensor  # [B, K-1, conv_dim] the last inputs of the convolution
    ssm: Tensor  # [B, H, N, P] fp32


class Mamba2(Mixer):
    section = "mamba2"

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.d_inner = s["expand"] * config.hidden_size
        self.head_dim, self.d_state, self.n_groups = s["head_dim"], s["state_size"], s["n_groups"]
        self.num_heads = self.d_inner // self.head_dim
        self.xb_heads = s["xb_heads"] or self.num_heads
        self.b_groups = s["xb_heads"] or self.n_groups
        self.conv_kernel, self.chunk_size = s["conv_kernel"], s["chunk_size"]
        self.conv_split = [self.xb_heads * self.head_dim, self.b_groups * self.d_state, self.n_groups * self.d_state]
        self.conv_dim = sum(self.conv_split)
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)
        self.init_special_parameters()

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {
            "state_size": 64,
            "head_dim": 64 if 2 * config.hidden_size % 64 == 0 else config.head_dim,
            "expand": 2,
            "n_groups": 1,
            "conv_kernel": 4,
            "chunk_size": 64,
            "dt_min": 0.001,
            "dt_max": 0.1,
            "dt_init_floor": 1e-4,
            "xb_heads": None,
        }

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        require_positive_int("mamba2", settings, "state_size", "head_dim", "expand", "n_groups", "conv_kernel", "chunk_size")
        d_inner = settings["expand"] * config.hidden_size
        if d_inner % settings["head_dim"]:
            raise ValueError(f"mamba2.head_dim: {settings['head_dim']} does not divide expand * hidden_size = {d_inner}")
        heads = d_inner // settings["head_dim"]
        if heads % settings["n_groups"]:
            raise ValueError(f"mamba2.n_groups: {settings['n_groups']} does not divide the number of heads {heads}")
        shared = settings["xb_heads"]
        if shared is not None:
            require_positive_int("mamba2", settings, "xb_heads")
            if heads % shared or settings["n_groups"] % shared:
                raise ValueError(
                    f"mamba2.xb_heads: {shared} must divide the number of heads {heads} and n_groups {settings['n_groups']}"
                )
        if not 0 < settings["dt_min"] <= settings["dt_max"]:
            raise ValueError("mamba2.dt_min: needs 0 < dt_min <= dt_max")

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        s = self.settings
        log_dt = torch.rand(self.num_heads) * (math.log(s["dt_max"]) - math.log(s["dt_min"])) + math.log(s["dt_min"])
        dt = log_dt.exp().clamp(min=s["dt_init_floor"])
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        init.copy_(self.A_log, torch.empty(self.num_heads).uniform_(1, 16).log())
        init.ones_(self.D)
        bound = 1 / math.sqrt(self.conv_kernel)
        init.uniform_(self.conv_weight, -bound, bound)
        init.uniform_(self.conv_bias, -bound, bound)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Mamba2State:
        return Mamba2State(
            conv=torch.zeros(batch_size, self.conv_kernel - 1, self.conv_dim, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.num_heads, self.d_state, self.head_dim, device=device),
        )

    def state_size(self, seq_len: int) -> int:
        return (self.conv_kernel - 1) * self.conv_dim + self.num_heads * self.d_state * self.head_dim

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: Mamba2State | None = None) -> Tensor:
        batch, length, _ = hidden_states.shape
        z, xbc, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.num_heads], dim=-1)
        if seq.token_mask is not None:
            xbc = xbc * seq.token_mask.unsqueeze(-1).to(xbc.dtype)

        past_conv = state.conv if state is not None else None
        if state is not None:
            state.conv = conv_tail(xbc, past_conv, self.conv_kernel, seq.seq_idx)
        xbc = F.silu(causal_depthwise_conv(xbc, self.conv_weight, self.conv_bias, past_conv, seq.seq_idx))
        x, b, c = xbc.split(self.conv_split, dim=-1)

        dt = F.softplus(dt.float() + self.dt_bias.float())  # [B, T, H]
        if seq.token_mask is not None:
            dt = dt * seq.token_mask.unsqueeze(-1)
        g = -torch.exp(self.A_log.float()) * dt
        x = x.unflatten(-1, (self.xb_heads, self.head_dim)).repeat_interleave(self.num_heads // self.xb_heads, dim=2)
        b = b.unflatten(-1, (self.b_groups, self.d_state)).repeat_interleave(self.n_groups // self.b_groups, dim=2)
        c = c.unflatten(-1, (self.n_groups, self.d_state))
        v = x * dt.unsqueeze(-1).to(x.dtype)

        if state is not None and length == 1 and not seq.has_documents:
            y, state.ssm = ssd_step(c[:, 0], b[:, 0], v[:, 0], g[:, 0], state.ssm)
            y = y.unsqueeze(1)
        else:
            y, final = self._scan(c, b, v, g, seq, None if state is None else state.ssm)
            if state is not None:
                state.ssm = final
        y = y + x * self.D.to(x.dtype).unsqueeze(-1)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def _scan(self, c: Tensor, b: Tensor, v: Tensor, g: Tensor, seq: SequenceInfo, initial: Tensor | None):
        want_final = initial is not None
        if not seq.has_documents:
            return ssd(c, b, v, g, initial_state=initial, output_final_state=want_final, chunk_size=self.chunk_size)
        # packed documents: one flat row, the state restarting at every boundary
        flat = [t.flatten(0, 1).unsqueeze(0) for t in (c, b, v, g)]
        y, final = ssd(
            *flat,
            initial_state=seq.flat_initial_states(initial),
            output_final_state=want_final,
            cu_seqlens=seq.cu_seqlens,
            chunk_size=self.chunk_size,
        )
        return y.view(v.shape), seq.row_final_states(final) if want_final else None
