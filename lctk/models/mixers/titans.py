"""Titans neural long-term memory (`T`), from Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at
Test Time" (2024).

The memory is a per-head MLP inside a residual LayerNorm (lucidrains/titans-pytorch's ResidualNorm around its
MemoryMLP: depth >= 1, expansion 4, GELU), M(x) = x + LayerNorm(W_L gelu(... gelu(W_1 x))) * (1 + g), that is trained
while it reads, by gradient descent with momentum and forgetting on the associative loss
l(M; k, v) = ||M(k) - v||^2 / D (the mean over channels, as lucidrains'); the gain g is a fast weight too:

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))      depthwise causal conv, kernel 4
    q, k = q / ||q||, k / ||k||                                            per head
    theta_t = max_inner_lr / chunk_size sigmoid(w_theta x_t),  eta_t = sigmoid(w_eta x_t),  alpha_t = sigmoid(w_alpha x_t)
    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)                 momentum, the "surprise"
    M_t = (1 - alpha_t) M_{t-1} + S_t                                      forgetting
    y_t = M_t(q_t)                                                         read after token t's write

t' is the start of t's chunk (chunk_size tokens counted from the document start): inside a chunk every
gradient is taken at the chunk-start weights, the paper's parallel (mini-batch) training. An MLP's per-token
gradient is rank one per layer, grad_t W_l = delta_tl a_tl^T, so the weights after token t of a chunk are

    W_t = A_t W + E_t S - sum_{i <= t} C_ti theta_i delta_i a_i^T          A_t = prod_{j <= t} (1 - alpha_j)
    C = D_alpha D_eta,   D_x[t, s] = prod_{s < j <= t} x_j for s <= t, else 0
    E_t = sum_s D_alpha[t, s] prod_{j <= s} eta_j

and reading through W_t never builds W_t: W_t u = A_t W u + E_t S u - sum_i C_ti theta_i (a_i . u) delta_i, an
attention-like product inside the chunk, layer after layer (the "dual form" of test-time training). Momentum
and decay thus run as a scan inside each chunk, chunks one after another (`memory_chunk`). Decoding runs the
recurrence token by token with explicit weights (`memory_step`); the two agree to rounding.

Variants (`titans.variant`); each has `persistent_tokens` learned key/value pairs every query attends to:
  MAG  memory as a gate: o = RMSNorm(SWA(x)) * sigmoid(RMSNorm(y)), memory and sliding-window attention side
       by side.
  MAL  memory as a layer: o = RMSNorm(SWA(W_m y)) * sigmoid(W_g x), the attention reads the memory's output; the
       output norm and linear gate before the projection are the paper's (section 4.4).
  MAC  memory as context: segments of chunk_size tokens; a segment reads the memory as it was at the segment
       start, h_i = M_{t'}(W_h x_i); each token attends causally over [persistent | h | segment] (h gets
       keys and values through its own projection); the attention output u is what the memory writes (k, v
       and the read query q from u), and the layer returns RMSNorm(u) * sigmoid(RMSNorm(M_t(q_t))), the
       paper's o = y (x) M*_t(y).

Choices where the paper leaves room: the MAC segment is the memory chunk (one state, no extra bookkeeping);
memory heads and widths are the attention's (num_attention_heads x head_dim); the initial memory weights are
learned (std 1/sqrt(fan_in), the gain 0, no weight decay); gate biases start at theta = max_inner_lr / 2 (sigmoid(0),
as lucidrains), eta = 0.5, alpha = 0.007; the gate normalises both branches per head with learned weights before the
sigmoid; MAC's short convolution is on the segment's read query only (the write's k, v, q come from the attention
output, which exists only inside the segment loop). Persistent memory follows lucidrains, not the paper: learned
key/value pairs every query attends to, without RoPE, where the paper prepends tokens that also pass through the
memory (the pairs add no positions to the memory's chunks, and cost nothing in the state).

The inner learning rate (different on purpose from lucidrains, which sums a chunk's per-token gradients under a
bound of 1): inside a chunk every gradient is taken at the same weights, so they add up before the weights move,
and the sum grows with chunk_size. theta is therefore the step on the chunk's mean gradient, theta_t / chunk_size
per token, and the bound means the same at every chunk size. Measured at initialisation with theta pinned at its
bound (one layer of width 256, 4 heads, chunk 64, 2048 random tokens): 2 stays finite (|logit| <= 2) and 4 gives NaN,
so the default is 2. The residual norm alone does not remove the need for a bound: with lucidrains' sum (theta per
token, not divided by chunk_size) the memory weights grew without bound at theta = 0.05 (1e7 by 1024 tokens) and were
NaN at 0.1; it is the norm's gain, a least-squares fit on unit-variance inputs, that goes first.

Shared with LaCT: `lctk.models.mixers.fast_weights.ChunkGrid` lays the real tokens of a call out in whole chunks per
document; `lctk.models.mixers.attention.window_attention` is sliding-window attention over a kept-key cache with
optional persistent key/value pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from lctk.models.layers import RMSNorm, apply_rotary, init_short_conv, short_conv
from lctk.models.mixers.attention import window_attention
from lctk.models.mixers.base import Mixer, MixerState, require_positive
from lctk.models.mixers.fast_weights import ChunkGrid, pack, unpack
from lctk.models.sequence import SequenceInfo

VARIANTS = ("MAC", "MAG", "MAL")
NORM_EPS = 1e-5  # the memory's LayerNorm
MAX_INNER_LR = 2.0  # bound on theta for the chunk's mean gradient (module docstring), whatever the chunk size


# ------------------------------------------------------------------------------------------ the memory MLP


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def gelu_grad(z: Tensor) -> Tensor:
    """d gelu(z) / dz (exact GELU): Phi(z) + z phi(z)."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def decay_matrix(cum: Tensor) -> Tensor:
    """cum [..., L] cumulative log-factors -> [..., L, L] with exp(cum_t - cum_s) for s <= t, else 0."""
    length = cum.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=cum.device).tril()
    return torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))


class MemoryMLP:
    """M(x) = x + LayerNorm(W_L gelu(... gelu(W_1 x))) * (1 + g): an MLP inside lucidrains' ResidualNorm, for
    weights [..., H, out, in] and inputs [..., H, L, in]. The gain g [D] is a fast weight like the matrices (it
    starts at 0 and the inner loop trains it, as lucidrains'); it is packed as a [D, 1] matrix whose input is the
    constant 1, so that its per-token gradient is rank one like every other layer's."""

    def __init__(self, dim: int, depth: int, expand: int):
        widths = [dim] + [dim * expand] * (depth - 1) + [dim]
        self.depth = depth
        self.shapes = [(widths[i + 1], widths[i]) for i in range(depth)] + [(dim, 1)]
        self.size = sum(rows * cols for rows, cols in self.shapes)

    @staticmethod
    def output(x: Tensor, hidden: Tensor, gain: Tensor) -> Tensor:
        """x + LayerNorm(hidden) * (1 + gain); gain [..., 1 or L, D]."""
        return x + F.layer_norm(hidden, hidden.shape[-1:], eps=NORM_EPS) * (1 + gain)

    def __call__(self, mats: list[Tensor], x: Tensor) -> Tensor:
        hidden = x
        for layer, w in enumerate(mats[:-1]):
            hidden = hidden @ w.transpose(-1, -2)
            if layer < self.depth - 1:
                hidden = F.gelu(hidden)
        return self.output(x, hidden, mats[-1].transpose(-1, -2))

    def gradients(self, mats: list[Tensor], k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-token gradients of ||M(k) - v||^2 / D as rank-one factors, grad W_l = deltas[l]^T inputs[l]
        summed over tokens. Returns (inputs [..., L, in_l], deltas [..., L, out_l]) per layer, the gain last."""
        inputs, pre = [], []
        x = k
        for layer, w in enumerate(mats[:-1]):
            inputs.append(x)
            z = x @ w.transpose(-1, -2)
            pre.append(z)
            x = F.gelu(z) if layer < self.depth - 1 else z
        normed = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
        gain = 1 + mats[-1].transpose(-1, -2)
        error = (k + normed * gain - v) * (2 / k.shape[-1])  # d/dM of the mean squared error, as lucidrains'
        # LayerNorm's backward: (g - mean g - normed mean(g normed)) / sigma
        upstream = error * gain
        sigma = (x.var(-1, unbiased=False, keepdim=True) + NORM_EPS).sqrt()
        delta = (
            upstream - upstream.mean(-1, keepdim=True) - normed * (upstream * normed).mean(-1, keepdim=True)
        ) / sigma
        deltas = [delta]
        for layer in range(self.depth - 1, 0, -1):
            delta = (delta @ mats[layer]) * gelu_grad(pre[layer - 1])
            deltas.insert(0, delta)
        return inputs + [torch.ones_like(k[..., :1])], deltas + [error * normed]


def memory_chunk(
    mlp: MemoryMLP,
    start: Tensor,
    weights: Tensor,
    surprise: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_momentum: Tensor,
    log_keep: Tensor,
    live: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk of the memory in the dual form (module docstring). start, weights, surprise [N, H, P] (the
    chunk-start weights where gradients are taken, the current weights, the momentum S); q, k, v [N, H, L, D];
    lr, log_momentum, log_keep [N, H, L]; live [N, L] (dead slots change nothing).
    Returns (retrieved [N, H, L, D], start, weights, surprise) after the chunk."""
    dtype = start.dtype  # fp32 states whatever the model's dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    alive = live[:, None, :].to(dtype)
    lr = lr.to(dtype) * alive
    cum_keep = (log_keep.to(dtype) * alive).cumsum(-1)
    cum_momentum = (log_momentum.to(dtype) * alive).cumsum(-1)
    keep_from = decay_matrix(cum_keep) * alive[..., None, :]  # D_alpha[t, s], only live s add their S_s
    coeff = keep_from @ decay_matrix(cum_momentum)  # C[t, i]
    coeff = coeff * lr[..., None, :]  # ... times theta_i
    surprise_weight = (keep_from @ cum_momentum.exp()[..., None]).squeeze(-1)  # E_t
    keep_weight = cum_keep.exp()  # A_t

    start_mats, mats, surprise_mats = (
        unpack(start, mlp.shapes),
        unpack(weights, mlp.shapes),
        unpack(surprise, mlp.shapes),
    )
    inputs, deltas = mlp.gradients(start_mats, k, v)

    def read(x: Tensor, w: Tensor, s: Tensor, a: Tensor, d: Tensor) -> Tensor:  # x W_t^T for every t
        return (
            keep_weight[..., None] * (x @ w.transpose(-1, -2))
            + surprise_weight[..., None] * (x @ s.transpose(-1, -2))
            - (coeff * (x @ a.transpose(-1, -2))) @ d
        )

    layers = list(zip(mats, surprise_mats, inputs, deltas))
    x = q
    for layer, parts in enumerate(layers[:-1]):
        x = read(x, *parts)
        if layer < mlp.depth - 1:
            x = F.gelu(x)
    x = mlp.output(q, x, read(torch.ones_like(q[..., :1]), *layers[-1]))  # the gain after each token

    # state after the last slot: t = L - 1
    to_end = (cum_momentum[..., -1:] - cum_momentum).exp() * lr  # prod_{j>i} eta_j theta_i
    new_mats = [
        keep_weight[..., -1, None, None] * w
        + surprise_weight[..., -1, None, None] * s
        - d.transpose(-1, -2) @ (coeff[..., -1, :, None] * a)
        for w, s, a, d in zip(mats, surprise_mats, inputs, deltas)
    ]
    new_surprise = [
        cum_momentum[..., -1, None, None].exp() * s - d.transpose(-1, -2) @ (to_end[..., None] * a)
        for s, a, d in zip(surprise_mats, inputs, deltas)
    ]
    new_weights = pack(new_mats)
    new_start = torch.where(live[:, -1, None, None], new_weights, start)
    return x, new_start, new_weights, pack(new_surprise)


def memory_step(
    mlp: MemoryMLP,
    start: Tensor,
    weights: Tensor,
    surprise: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    log_momentum: Tensor,
    log_keep: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One token with explicit weights: q, k, v [B, H, D]; lr, log_* [B, H].
    Returns (retrieved, weights, surprise)."""
    dtype = start.dtype
    inputs, deltas = mlp.gradients(
        unpack(start, mlp.shapes), k.to(dtype)[..., None, :], v.to(dtype)[..., None, :]
    )
    grads = pack([d.transpose(-1, -2) @ a for a, d in zip(inputs, deltas)])
    surprise = log_momentum.to(dtype).exp()[..., None] * surprise - lr.to(dtype)[..., None] * grads
    weights = log_keep.to(dtype).exp()[..., None] * weights + surprise
    return mlp(unpack(weights, mlp.shapes), q.to(dtype)[..., None, :])[..., 0, :], weights, surprise


# ------------------------------------------------------------------------------------------------ the mixer


@dataclass
class TitansState(MixerState):
    start: Tensor  # [B, H, P] memory weights at the start of the current chunk (gradients are taken there)
    weights: Tensor  # [B, H, P] current memory weights
    surprise: Tensor  # [B, H, P] momentum S
    absorbed: Tensor  # [B] tokens of the current document so far
    conv: Tensor  # [B, K-1, conv_dim]
    keys: Tensor  # MAG/MAL: [B, S, H, D] kept window keys; MAC: [B, 2, L, H, D] segment and retrieved keys
    values: Tensor
    seen: int = 0


class Titans(Mixer):
    section = "titans"
    rotary = True
    special_settings = ("persistent_tokens",)  # may be 0

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        return "`T` (Titans) does not run context-parallel yet: its memory is not passed from shard to shard"

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.variant = s["variant"]
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.chunk_size, self.window, self.conv_kernel = s["chunk_size"], s["window"], s["conv_kernel"]
        self.max_inner_lr = s["max_inner_lr"]
        self.mlp = MemoryMLP(self.head_dim, s["memory_depth"], s["memory_expand"])
        inner = self.num_heads * self.head_dim
        hidden = config.hidden_size

        self.attn_qkv = nn.Linear(hidden, 3 * inner, bias=False)
        self.gates = nn.Linear(hidden, 3 * self.num_heads)  # theta, eta, alpha per head
        self.memory_init = nn.Parameter(torch.empty(self.num_heads, self.mlp.size))
        tokens = s["persistent_tokens"]
        self.persistent = (
            nn.Parameter(torch.empty(2, tokens, self.num_heads, self.head_dim)) if tokens else None
        )
        for param in (self.memory_init, self.persistent):
            if param is not None:
                param._no_weight_decay = True
        if self.variant == "MAC":
            self.conv_dim = inner
            self.read_proj = nn.Linear(hidden, inner, bias=False)  # the segment's query into the memory
            self.retrieved_kv = nn.Linear(inner, 2 * inner, bias=False)
            self.memory_qkv = nn.Linear(inner, 3 * inner, bias=False)  # from the attention output
        else:
            self.conv_dim = 3 * inner
            self.memory_qkv = nn.Linear(hidden, 3 * inner, bias=False)
        self.attn_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if self.variant == "MAL":
            self.memory_out = nn.Linear(inner, hidden, bias=False)
            self.out_gate = nn.Linear(hidden, inner, bias=False)
        else:
            self.memory_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, self.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        self.init_special_parameters()

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {
            "variant": "MAG",
            "memory_depth": 2,
            "memory_expand": 4,
            "chunk_size": 64,
            "window": 512,
            "persistent_tokens": 4,
            "conv_kernel": 4,
            "max_inner_lr": MAX_INNER_LR,
        }

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        if settings["variant"] not in VARIANTS:
            raise ValueError(f"titans.variant: {settings['variant']!r} is not one of {', '.join(VARIANTS)}")
        tokens = settings["persistent_tokens"]
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"titans.persistent_tokens: must be a non-negative integer, got {tokens!r}")
        require_positive("titans.max_inner_lr", settings["max_inner_lr"], integer=False)

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        memory = [torch.randn(self.num_heads, rows, cols) / math.sqrt(cols) for rows, cols in self.mlp.shapes[:-1]]
        gain = torch.zeros(self.num_heads, *self.mlp.shapes[-1])  # the norm starts as a plain LayerNorm
        init.copy_(self.memory_init, pack([*memory, gain]))
        if self.persistent is not None:
            init.normal_(self.persistent, std=0.02)
        bias = torch.tensor([0.0, _logit(0.5), _logit(0.007)])  # theta starts at half its bound, as lucidrains'
        init.copy_(self.gates.bias, bias.repeat_interleave(self.num_heads))
        init_short_conv(self.conv_weight, self.conv_bias)

    # ---------------------------------------------------------------------------------------------- state

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> TitansState:
        memory = self.memory_init.detach().to(device, self.state_dtype).expand(batch_size, -1, -1)
        if self.variant == "MAC":
            kv_shape = (batch_size, 2, self.chunk_size, self.num_heads, self.head_dim)
        else:
            kv_shape = (batch_size, 0, self.num_heads, self.head_dim)
        return TitansState(
            start=memory.clone(),
            weights=memory.clone(),
            surprise=torch.zeros_like(memory),
            absorbed=torch.zeros(batch_size, dtype=torch.long, device=device),
            conv=torch.zeros(batch_size, self.conv_kernel - 1, self.conv_dim, device=device, dtype=dtype),
            keys=torch.zeros(kv_shape, device=device, dtype=dtype),
            values=torch.zeros(kv_shape, device=device, dtype=dtype),
        )

    @property
    def state_dtype(self) -> torch.dtype:
        """fp32 memory for bf16/fp16 models (fp64 ones stay fp64)."""
        return torch.promote_types(self.memory_init.dtype, torch.float32)

    def state_size(self, seq_len: int) -> int:
        memory = 3 * self.num_heads * self.mlp.size + 1 + (self.conv_kernel - 1) * self.conv_dim
        kept = 2 * self.chunk_size if self.variant == "MAC" else min(seq_len, self.window - 1)
        return memory + 2 * kept * self.num_heads * self.head_dim

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: TitansState | None = None) -> Tensor:
        lr, log_momentum, log_keep = self._gates(hidden_states)
        if self.variant == "MAC":
            return self._forward_mac(hidden_states, seq, state, lr, log_momentum, log_keep)
        q, k, v = self._conv_heads(self.memory_qkv(hidden_states), seq, state).chunk(3, dim=2)
        retrieved = self._memory(
            F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, lr, log_momentum, log_keep, seq, state
        )
        retrieved = retrieved.to(hidden_states.dtype)
        attn_input = self.memory_out(retrieved.flatten(-2)) if self.variant == "MAL" else hidden_states
        attended = self._window(attn_input, seq, state)
        if self.variant == "MAL":  # the paper's output norm and linear gate before the projection
            gate = torch.sigmoid(self.out_gate(hidden_states)).unflatten(-1, (self.num_heads, self.head_dim))
            return self.o_proj((self.attn_norm(attended) * gate).flatten(-2))
        return self.o_proj(self._gate(attended, retrieved).flatten(-2))

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """theta [B, T, H], log eta, log(1 - alpha), in the state dtype."""
        lr, momentum, forget = self.gates(x).to(self.state_dtype).chunk(3, dim=-1)
        # a chunk's gradients all act at once: theta is the step on their mean (per token: theta / chunk_size)
        theta = self.max_inner_lr / self.chunk_size * torch.sigmoid(lr)
        return theta, F.logsigmoid(momentum), F.logsigmoid(-forget)

    def _conv_heads(self, x: Tensor, seq: SequenceInfo, state: TitansState | None) -> Tensor:
        """silu(causal depthwise conv(x)) -> [B, T, channels / D, D]; padding enters as zeros."""
        x = short_conv(x, self.conv_weight, self.conv_bias, seq, state, tag=f"{self.letter} conv")
        return x.unflatten(-1, (-1, self.head_dim))

    def _gate(self, attended: Tensor, retrieved: Tensor) -> Tensor:
        return self.attn_norm(attended) * torch.sigmoid(self.memory_norm(retrieved.to(attended.dtype)))

    def _window(self, x: Tensor, seq: SequenceInfo, state: TitansState | None) -> Tensor:
        q, k, v = self.attn_qkv(x).unflatten(-1, (3 * self.num_heads, self.head_dim)).chunk(3, dim=2)
        cos, sin = seq.rotary
        past = (state.keys, state.values, state.seen) if state is not None else None
        out, (keys, values, seen) = window_attention(
            apply_rotary(q, cos, sin),
            apply_rotary(k, cos, sin),
            v,
            seq,
            self.window,
            past,
            self.persistent,
        )
        if state is not None:
            state.keys, state.values, state.seen = keys, values, seen
        return out

    def _memory(
        self, q, k, v, lr, log_momentum, log_keep, seq: SequenceInfo, state: TitansState | None
    ) -> Tensor:
        """Retrievals y_t = M_t(q_t) [B, T, H, D] in the state dtype; updates the state's memory."""
        batch, length = q.shape[:2]
        if state is not None and length == 1 and not seq.has_documents:
            return self._memory_step(
                q[:, 0], k[:, 0], v[:, 0], lr[:, 0], log_momentum[:, 0], log_keep[:, 0], seq, state
            )[:, None]
        grid = ChunkGrid.build(
            seq, batch, length, self.chunk_size, state.absorbed if state is not None else None, aligned=True
        )
        start, weights, surprise = self._initial_memory(grid, state)
        live = grid.live()
        heads_first = lambda t: grid.to_grid(t).transpose(2, 3)  # noqa: E731  [N, C, H, L, ...]
        q, k, v, lr, log_momentum, log_keep = map(heads_first, (q, k, v, lr, log_momentum, log_keep))
        outs = []
        for c in range(grid.shape[1]):
            out, start, weights, surprise = memory_chunk(
                self.mlp,
                start,
                weights,
                surprise,
                q[:, c],
                k[:, c],
                v[:, c],
                lr[:, c],
                log_momentum[:, c],
                log_keep[:, c],
                live[:, c],
            )
            outs.append(out.transpose(1, 2))
        self._final_memory(grid, state, start, weights, surprise)
        return grid.to_tokens(torch.stack(outs, dim=1), batch, length)

    def _memory_step(
        self, q, k, v, lr, log_momentum, log_keep, seq: SequenceInfo, state: TitansState
    ) -> Tensor:
        out, weights, surprise = memory_step(
            self.mlp, state.start, state.weights, state.surprise, q, k, v, lr, log_momentum, log_keep
        )
        real = (
            seq.token_mask[:, 0]
            if seq.token_mask is not None
            else torch.ones_like(state.absorbed, dtype=torch.bool)
        )
        absorbed = state.absorbed + real.long()
        state.weights = torch.where(real[:, None, None], weights, state.weights)
        state.surprise = torch.where(real[:, None, None], surprise, state.surprise)
        state.start = torch.where(
            (real & (absorbed % self.chunk_size == 0))[:, None, None], state.weights, state.start
        )
        state.absorbed = absorbed
        return out

    def _initial_memory(self, grid: ChunkGrid, state: TitansState | None) -> tuple[Tensor, Tensor, Tensor]:
        """(start, weights, surprise) per sequence: a row's cached memory, or the learned initial one."""
        fresh = self.memory_init.to(self.state_dtype).unsqueeze(0)
        cached = (state.start, state.weights, state.surprise) if state is not None else (None, None, None)
        return tuple(
            grid.initial(row, init) for row, init in zip(cached, (fresh, fresh, torch.zeros_like(fresh)))
        )

    def _final_memory(self, grid: ChunkGrid, state: TitansState | None, start, weights, surprise) -> None:
        if state is not None:
            state.start, state.weights, state.surprise = (
                grid.final(start),
                grid.final(weights),
                grid.final(surprise),
            )
            state.absorbed = grid.absorbed_after(state.absorbed)

    # ------------------------------------------------------------------------------------------------ MAC

    def _forward_mac(
        self, x: Tensor, seq: SequenceInfo, state: TitansState | None, lr, log_momentum, log_keep
    ) -> Tensor:
        batch, length, _ = x.shape
        read = F.normalize(self._conv_heads(self.read_proj(x), seq, state), dim=-1)
        q, k, v = self.attn_qkv(x).unflatten(-1, (3 * self.num_heads, self.head_dim)).chunk(3, dim=2)
        cos, sin = seq.rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None and length == 1 and not seq.has_documents:
            return self._mac_step(read, q, k, v, cos, sin, lr, log_momentum, log_keep, seq, state)

        grid = ChunkGrid.build(
            seq, batch, length, self.chunk_size, state.absorbed if state is not None else None, aligned=True
        )
        live = grid.live()
        read, q, k, v, cos, sin = map(grid.to_grid, (read, q, k, v, cos, sin))
        lr, log_momentum, log_keep = (grid.to_grid(t).transpose(2, 3) for t in (lr, log_momentum, log_keep))
        # the cached part of each row's current segment fills the first slots of its first sequence's chunk 0
        cached_keys = k.new_zeros(grid.shape[0], 2, grid.shape[2], self.num_heads, self.head_dim)
        cached_values = torch.zeros_like(cached_keys)
        cached = torch.zeros(grid.shape[0], grid.shape[2], dtype=torch.bool, device=x.device)
        if state is not None:
            in_use = torch.arange(self.chunk_size, device=x.device) < grid.phase[grid.first_seq, None]
            cached[grid.first_seq] = in_use
            cached_keys[grid.first_seq] = state.keys.to(k.dtype) * in_use[:, None, :, None, None]
            cached_values[grid.first_seq] = state.values.to(v.dtype) * in_use[:, None, :, None, None]
        causal = torch.ones(grid.shape[2], grid.shape[2], dtype=torch.bool, device=x.device).tril()

        start, weights, surprise = self._initial_memory(grid, state)
        outs, segment_keys, segment_values = [], [], []
        for c in range(grid.shape[1]):
            retrieved_k, retrieved_v = self._read_memory(start, read[:, c], cos[:, c], sin[:, c])
            keys, values = (
                torch.stack([k[:, c], retrieved_k], dim=1),
                torch.stack([v[:, c], retrieved_v], dim=1),
            )
            visible = live[:, c]
            if c == 0:
                keys, values, visible = keys + cached_keys, values + cached_values, visible | cached
            segment_keys.append(keys)
            segment_values.append(values)
            attended = self._segment_attention(q[:, c], keys, values, causal & visible[:, None, :])
            mq, mk, mv = (t.transpose(1, 2) for t in self._write_inputs(attended))
            out, start, weights, surprise = memory_chunk(
                self.mlp,
                start,
                weights,
                surprise,
                mq,
                mk,
                mv,
                lr[:, c],
                log_momentum[:, c],
                log_keep[:, c],
                live[:, c],
            )
            outs.append(self._gate(attended, out.transpose(1, 2)))
        if state is not None:
            rows, last = grid.last_seq, grid.final(grid.last_chunk())
            state.keys = torch.stack(segment_keys, dim=1)[rows, last]
            state.values = torch.stack(segment_values, dim=1)[rows, last]
        self._final_memory(grid, state, start, weights, surprise)
        return self.o_proj(grid.to_tokens(torch.stack(outs, dim=1), batch, length).flatten(-2))

    def _mac_step(
        self, read, q, k, v, cos, sin, lr, log_momentum, log_keep, seq, state: TitansState
    ) -> Tensor:
        """One token per row into the cached segment: read, q, k, v [B, 1, H, D]; cos, sin [B, 1, D]."""
        slot = state.absorbed % self.chunk_size
        here = (torch.arange(self.chunk_size, device=q.device) == slot[:, None])[:, None, :, None, None]
        if seq.token_mask is not None:
            here = here & seq.token_mask[:, 0, None, None, None, None]
        retrieved_k, retrieved_v = self._read_memory(state.start, read, cos, sin)
        state.keys = torch.where(here, torch.stack([k, retrieved_k], dim=1).to(state.keys.dtype), state.keys)
        state.values = torch.where(
            here, torch.stack([v, retrieved_v], dim=1).to(state.values.dtype), state.values
        )
        visible = torch.arange(self.chunk_size, device=q.device) <= slot[:, None]
        attended = self._segment_attention(
            q, state.keys.to(q.dtype), state.values.to(q.dtype), visible[:, None, :]
        )
        mq, mk, mv = (t[:, 0] for t in self._write_inputs(attended))
        out = self._memory_step(mq, mk, mv, lr[:, 0], log_momentum[:, 0], log_keep[:, 0], seq, state)
        return self.o_proj(self._gate(attended, out[:, None]).flatten(-2))

    def _read_memory(self, start: Tensor, read: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The segment read from the chunk-start memory, as keys (with RoPE) and values [N, L, H, D]."""
        retrieved = self.mlp(unpack(start, self.mlp.shapes), read.transpose(1, 2).to(start.dtype)).transpose(
            1, 2
        )
        kv = self.retrieved_kv(retrieved.to(read.dtype).flatten(-2)).unflatten(
            -1, (2 * self.num_heads, self.head_dim)
        )
        keys, values = kv.chunk(2, dim=2)
        return apply_rotary(keys, cos, sin), values

    def _write_inputs(self, attended: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Memory query, key, value [N, L, H, D] from the attention output."""
        mq, mk, mv = (
            F.silu(self.memory_qkv(attended.flatten(-2))).unflatten(-1, (3 * self.num_heads, -1)).chunk(3, 2)
        )
        return F.normalize(mq, dim=-1), F.normalize(mk, dim=-1), mv

    def _segment_attention(self, q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor) -> Tensor:
        """q [N, Lq, H, D]; keys/values [N, 2, L, H, D] (segment tokens, retrieved tokens);
        allowed [N, Lq, L]: the slots each query sees, of both kinds, besides the persistent tokens."""
        n, queries = q.shape[:2]
        diagonal = torch.eye(queries, allowed.shape[-1], dtype=torch.bool, device=q.device)
        allowed = allowed | diagonal  # a query in an empty slot sees something: no empty softmax row
        allowed = torch.cat([allowed, allowed], dim=-1)
        keys, values = keys.flatten(1, 2), values.flatten(1, 2)
        persistent = self.persistent
        if persistent is not None:
            keys = torch.cat([persistent[0].to(keys.dtype).expand(n, -1, -1, -1), keys], dim=1)
            values = torch.cat([persistent[1].to(values.dtype).expand(n, -1, -1, -1), values], dim=1)
            allowed = F.pad(allowed, (persistent.shape[1], 0), value=True)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=allowed.unsqueeze(1)
        )
        return out.transpose(1, 2)
