"""Gated short convolution (`C`), the BaseConv layer BASED (Arora et al., "Simple linear attention language
models balance the recall-throughput tradeoff", 2024) takes from Zoology (Arora et al., 2023):

    u, z = in_proj(x)                           hidden_size -> 2 inner, inner = expand * hidden_size
    y = silu(causal_depthwise_conv(u)) * z      kernel K (3), per channel, with bias
    out = out_proj(y)                           inner -> hidden_size

Zoology's BaseConv multiplies a convolution of the input by a linear projection of it; here the convolution is
the short (K = 3) one of the BASED language models, not a long implicit filter. Choices: expand = 2
(in_proj d -> 4d); SiLU on the convolved half, as in Mamba's short convolution. The state for generation is the
last K - 1 inputs of the convolution. Padding tokens enter the convolution as zeros, as a document start does.
Rows split across processes: the convolution takes the previous shard's last K - 1 inputs (lctk.parallel.context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lctk.models.layers import init_short_conv, short_conv
from lctk.models.mixers.base import Mixer, MixerState, short_shard
from lctk.models.sequence import SequenceInfo


@dataclass
class BaseConvState(MixerState):
    conv: Tensor  # [B, K-1, inner] the last inputs of the convolution


class BaseConv(Mixer):
    section = "baseconv"

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        self.inner = self.settings["expand"] * config.hidden_size
        self.conv_kernel = self.settings["conv_kernel"]
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.inner, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.inner))
        self.out_proj = nn.Linear(self.inner, config.hidden_size, bias=False)
        self.init_special_parameters()

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {"expand": 2, "conv_kernel": 3}

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        if settings["conv_kernel"] < 2:
            raise ValueError(f"baseconv.conv_kernel: must be at least 2, got {settings['conv_kernel']}")

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        init_short_conv(self.conv_weight, self.conv_bias)

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        return short_shard("C", config.baseconv["conv_kernel"] - 1, "baseconv.conv_kernel - 1", shard_length)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> BaseConvState:
        return BaseConvState(
            conv=torch.zeros(batch_size, self.conv_kernel - 1, self.inner, device=device, dtype=dtype)
        )

    def state_size(self, seq_len: int) -> int:
        return (self.conv_kernel - 1) * self.inner

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: BaseConvState | None = None) -> Tensor:
        u, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        u = short_conv(u, self.conv_weight, self.conv_bias, seq, state, tag=f"{self.letter} conv")
        return self.out_proj(u * z)
