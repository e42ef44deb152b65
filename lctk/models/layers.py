"""Building blocks shared by the mixers: norms, the SwiGLU MLP, rotary embeddings and the short causal depthwise
convolution (`short_conv`: Mamba-2, BaseConv, Titans, Gated DeltaNet, KDA), which respects document boundaries,
padding, the cached state and context-parallel shards."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

if TYPE_CHECKING:
    from lctk.models.sequence import SequenceInfo


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # normalised in fp32 (torch's fused kernel: one op where the written-out form takes five), then the weight
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) per group of channels (Mamba-2's norm before out_proj, norm_before_gate=False).

    In training it is recomputed in backward: autograd would keep five [T, dim] tensors, four of them fp32 copies
    (28 KB per token at dim 1536, half of a Mamba-2 layer's saved activations); recomputed, it keeps x (z is a view
    of in_proj's output, which is kept anyway)."""

    def __init__(self, dim: int, n_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or z.requires_grad):
            return checkpoint(self._norm, x, z, use_reentrant=False, preserve_rng_state=False)
        return self._norm(x, z)

    def _norm(self, x: Tensor, z: Tensor) -> Tensor:
        gated = (x.float() * F.silu(z.float())).unflatten(-1, (self.n_groups, -1))
        return self.weight * F.rms_norm(gated, gated.shape[-1:], eps=self.eps).flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """cos/sin tables from `config.rope_parameters`, through transformers' own RoPE initialisers so that every
    scaling method transformers knows (linear, dynamic, yarn, llama3, ...) works the way transformers reads it."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, self.compute_default_rope_parameters)
        inv_freq, self.attention_scaling = init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, **_) -> tuple[Tensor, float]:
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        angles = torch.cat([freqs, freqs], dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] (rotate-half convention, as Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    # written as Llama's (not addcmul, which rounds once less): copied layers give the teacher's logits bit for bit
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


def causal_depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None, seq_idx: Tensor | None
) -> Tensor:
    """Depthwise causal convolution that does not look across document boundaries.

    x [B, T, D]; weight [D, K] (weight[:, -1] multiplies the current token); past [B, K-1, D] (the inputs before x,
    zeros at the start of a sequence) or None; seq_idx [B, T] document index of each token or None.
    """
    if past is None:
        past = x.new_zeros(x.shape[0], weight.shape[1] - 1, x.shape[2])
    bias = x.new_zeros(x.shape[2]) if bias is None else bias
    return _DepthwiseConv.apply(x, weight, bias, past.to(x.dtype), _tap_masks(seq_idx, weight.shape[1], x.dtype))


def _tap_masks(seq_idx: Tensor | None, kernel: int, dtype: torch.dtype) -> list[Tensor | None]:
    """For each shift s >= 1, [B, T, 1]: 1 where the token s steps back is in the same document (the past before
    the call counts as document 0), else 0. None everywhere when there are no boundaries."""
    if seq_idx is None:
        return [None] * kernel
    return [None] + [
        (F.pad(seq_idx, (shift, 0), value=0)[:, : seq_idx.shape[1]] == seq_idx).unsqueeze(-1).to(dtype)
        for shift in range(1, kernel)
    ]


class _DepthwiseConv(torch.autograd.Function):
    """K shifted multiply-adds written in place on slices (no padded copy of x), with the matching backward.
    K is 3-4 here, so this beats a grouped conv1d on the CPU and lets a boundary mask each tap exactly."""

    @staticmethod
    def forward(ctx, x, weight, bias, past, masks):
        kernel, length = weight.shape[1], x.shape[1]
        out = torch.addcmul(bias.to(x.dtype), x, weight[:, -1].to(x.dtype))
        for shift in range(1, kernel):
            tap = weight[:, -1 - shift].to(x.dtype)
            inside = min(shift, length)
            # tokens whose tap reaches back into x, then those whose tap reads the past inputs
            contribution = x[:, : length - inside] * tap
            before = past[:, kernel - 1 - shift : kernel - 1 - shift + inside] * tap
            if masks[shift] is not None:
                contribution = contribution * masks[shift][:, inside:]
                before = before * masks[shift][:, :inside]
            out[:, inside:] += contribution
            out[:, :inside] += before
        ctx.save_for_backward(x, weight, past)
        ctx.masks = masks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, past = ctx.saved_tensors
        kernel, length = weight.shape[1], x.shape[1]
        grad_x = grad_out * weight[:, -1].to(grad_out.dtype)
        grad_w = torch.empty_like(weight)
        grad_w[:, -1] = (grad_out * x).sum((0, 1)).to(weight.dtype)
        grad_past = torch.zeros_like(past)
        for shift in range(1, kernel):
            inside = min(shift, length)
            g_in, g_before = grad_out[:, inside:], grad_out[:, :inside]
            if ctx.masks[shift] is not None:
                g_in, g_before = g_in * ctx.masks[shift][:, inside:], g_before * ctx.masks[shift][:, :inside]
            tap = weight[:, -1 - shift].to(grad_out.dtype)
            grad_x[:, : length - inside] += g_in * tap
            past_slice = slice(kernel - 1 - shift, kernel - 1 - shift + inside)
            grad_past[:, past_slice] += g_before * tap
            grad_w[:, -1 - shift] = ((g_in * x[:, : length - inside]).sum((0, 1)) + (g_before * past[:, past_slice]).sum((0, 1))).to(weight.dtype)
        return grad_x, grad_w, grad_out.sum((0, 1)), grad_past, None


def init_short_conv(weight: Tensor, bias: Tensor | None = None) -> None:
    """nn.Conv1d's default for a short convolution's [D, K] weight (and bias): U(-1/sqrt(K), 1/sqrt(K)), as mamba's
    conv1d and fla's ShortConvolution."""
    bound = 1 / math.sqrt(weight.shape[1])
    init.uniform_(weight, -bound, bound)
    if bias is not None:
        init.uniform_(bias, -bound, bound)


def short_conv(x: Tensor, weight: Tensor, bias: Tensor | None, seq: SequenceInfo, state=None, tag: str = "conv") -> Tensor:
    """silu(causal depthwise conv(x)), the short convolution of every mixer that has one: padding enters as zeros
    (seq.token_mask), no tap reaches into another document (seq.seq_idx), and the inputs before x are the state's
    (`state.conv`, generation), the previous shard's last ones (seq.shard, context parallel; `tag` names that
    exchange) or zeros. With `state`, its conv becomes the last K-1 inputs (stateful_conv)."""
    if seq.token_mask is not None:
        x = x * seq.token_mask.unsqueeze(-1).to(x.dtype)
    past = state.conv if state is not None else None
    if seq.shard is not None:  # the previous shard's last inputs continue this shard's convolution
        past = seq.shard.conv_halo(x, weight.shape[1], seq.seq_idx, tag=tag)
    return F.silu(stateful_conv(x, weight, bias, past, seq.seq_idx, state))


def stateful_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, past: Tensor | None, seq_idx: Tensor | None, state=None
) -> Tensor:
    """causal_depthwise_conv of x after the inputs `past`; with `state` (a MixerState with a `conv` tensor, which
    `past` may be) its conv becomes the last K-1 inputs: in place outside autograd (the state keeps its address; a
    decode step takes three ops), by rebinding under autograd (a state carried through checkpointed segments must
    not be overwritten)."""
    if state is None:
        return causal_depthwise_conv(x, weight, bias, past, seq_idx)
    if x.shape[1] == 1 and seq_idx is None and past is state.conv and not torch.is_grad_enabled():
        window = torch.cat([state.conv, x.to(state.conv.dtype)], dim=1)  # [B, K, D]
        state.conv.copy_(window[:, 1:])
        out = (window * weight.t().to(window.dtype)).sum(1, keepdim=True)
        return (out if bias is None else out + bias.to(out.dtype)).to(x.dtype)
    tail = conv_tail(x, past, weight.shape[1], seq_idx)
    out = causal_depthwise_conv(x, weight, bias, past, seq_idx)  # before the state changes: `past` may be it
    if torch.is_grad_enabled():
        state.conv = tail
    else:
        state.conv.copy_(tail)
    return out


def conv_tail(x: Tensor, past: Tensor | None, kernel: int, seq_idx: Tensor | None = None) -> Tensor:
    """The last K-1 inputs, the conv state for the next call: [B, K-1, D]. Inputs of a document other than the
    row's last one are zeroed, since the next call continues that last document."""
    if past is None:
        past = x.new_zeros(x.shape[0], kernel - 1, x.shape[2])
    tail = torch.cat([past.to(x.dtype), x], dim=1)[:, -(kernel - 1) :]
    if seq_idx is not None:
        tail_seq = F.pad(seq_idx, (kernel - 1, 0), value=0)[:, -(kernel - 1) :]
        tail = tail * (tail_seq == seq_idx[:, -1:]).unsqueeze(-1).to(tail.dtype)
    return tail


def silu_grad(z: Tensor) -> Tensor:
    """d silu(z) / dz, for the hand-written gradients of test-time-trained memories."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))
