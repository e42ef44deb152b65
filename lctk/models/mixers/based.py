"""BASED linear attention (`B`), from Arora et al., "Simple linear attention language models balance the
recall-throughput tradeoff" (2024), with its 2nd-order Taylor feature map:

    q_t, k_t = W_q x_t, W_k x_t                    H heads of feature_dim f (16 in the paper)
    v_t = W_v x_t                                  H heads of d_v = hidden_size / H
    phi(x) = [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))]     1 + f + f^2 features (273 for f = 16)
      so that phi(q) . phi(k) = 1 + q.k / sqrt(f) + (q.k)^2 / (2 f), the Taylor series of exp(q.k / sqrt(f))
    S_t = S_{t-1} + phi(k_t) v_t^T,   z_t = z_{t-1} + phi(k_t)       no decay
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),   out = W_o y

Both sums are one call of `lctk.kernels.ssd` with g = None: v gets a column of ones appended, so the last
output column is the normaliser phi(q_t)^T z_t, and the state [H, 1 + f + f^2, d_v + 1] holds S and z side by
side. The denominator is positive without eps (1 + a + a^2 / 2 > 0); eps only guards rounding. Choices:
query/key heads = value heads = `num_heads` (default num_attention_heads); no decay and no short convolution
inside the layer (BASED places BaseConv `C` layers beside it); the division in fp32. Padding tokens get
phi(k) = 0, which adds nothing to S or z. Rows split across processes take the earlier shards' S and z through
`ssd_rows` (lctk.parallel.context: a gathered scan of the final states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lctk.models.mixers.base import Mixer, MixerState
from lctk.models.mixers.linear_recurrence import recurrent_step, ssd_rows
from lctk.models.sequence import SequenceInfo


def taylor_features(x: Tensor) -> Tensor:
    """phi(x) for the last dim: [..., f] -> [..., 1 + f + f^2]."""
    dim = x.shape[-1]
    square = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2 * dim)
    return torch.cat([torch.ones_like(x[..., :1]), x / dim**0.25, square], dim=-1)


@dataclass
class BasedState(MixerState):
    kv: Tensor  # [B, H, 1 + f + f^2, d_v + 1] fp32: sum phi(k) v^T, and sum phi(k) in the last column


class Based(Mixer):
    section = "based"

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.num_heads, self.feature_dim = s["num_heads"], s["feature_dim"]
        self.value_dim = config.hidden_size // self.num_heads
        self.expanded_dim = 1 + self.feature_dim + self.feature_dim**2
        self.chunk_size, self.eps = s["chunk_size"], s["eps"]
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.feature_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_heads * self.feature_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_heads * self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.value_dim, config.hidden_size, bias=False)

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {"num_heads": config.num_attention_heads, "feature_dim": 16, "chunk_size": 64, "eps": 1e-6}

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        if config.hidden_size % settings["num_heads"]:
            raise ValueError(
                f"based.num_heads: {settings['num_heads']} does not divide hidden_size {config.hidden_size}"
            )

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> BasedState:
        return BasedState(
            kv=torch.zeros(batch_size, self.num_heads, self.expanded_dim, self.value_dim + 1, device=device)
        )

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.expanded_dim * (self.value_dim + 1)

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: BasedState | None = None) -> Tensor:
        batch, length, _ = hidden_states.shape
        q = taylor_features(self.q_proj(hidden_states).unflatten(-1, (self.num_heads, self.feature_dim)))
        k = taylor_features(self.k_proj(hidden_states).unflatten(-1, (self.num_heads, self.feature_dim)))
        if seq.token_mask is not None:
            k = k * seq.token_mask[:, :, None, None].to(k.dtype)
        v = self.v_proj(hidden_states).unflatten(-1, (self.num_heads, self.value_dim))
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)

        if state is not None and length == 1 and not seq.has_documents and not torch.is_grad_enabled():
            out = recurrent_step(q[:, 0], k[:, 0], v[:, 0], None, state.kv).unsqueeze(1)
        else:
            out, final = ssd_rows(q, k, v, None, seq, None if state is None else state.kv, self.chunk_size, "B state")
            if state is not None:
                state.kv = final
        out = out.float()
        out = out[..., :-1] / (out[..., -1:] + self.eps)
        return self.o_proj(out.flatten(-2).to(hidden_states.dtype))
