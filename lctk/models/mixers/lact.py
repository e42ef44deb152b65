"""LaCT, large-chunk test-time training (`L`), from Zhang et al., "Test-Time Training Done Right" (2025), its
language-model layer: sliding-window attention and a fast-weight memory updated once per large chunk,
sharing one q/k/v projection.

    q, k, v = W_qkv x
    a = SWA(rope(q), rope(k), v)                    num_attention_heads x head_dim, window w
    per LaCT head (H heads of D = hidden_size / H):
      q', k' = rope(l2norm(silu(q s_q + b_q))), rope(l2norm(silu(k s_k + b_k))),  v' = silu(v)    s, b per channel
      f_W(x) = W1 (silu(W0 x) * (W2 x))              SwiGLU fast weights W0, W2 [D e, D], W1 [D, D e]
      lr0, lr1, lr2 = softplus(W_lr x + softplus^-1(base_lr))     per token, one per fast-weight matrix
      chunk c (chunk_size tokens counted from the document start), apply then update:
        o_t = f_{W_c}(q'_t) for every t in chunk c      (earlier chunks only; the SWA covers this one)
        G = grad_W sum_{t in c} lr_t <f_W(k'_t), v'_t> at W_c     one step on the negative dot-product loss
        G = G + mean_{t in c}(m_t) G_prev,  m_t = sigmoid(W_m x_t)    optional momentum
        G = NewtonSchulz(G)                          optional Muon orthogonalisation
        W_{c+1} = rownorm(W_c + G) * ||rows of W_0||   each row rescaled to its initial norm
      y_t = RMSNorm(o_t) * silu(W_s x_t)             per-head norm, learned per-head scale
    out = W_o (a + y)

Decoding keeps W_c and the running sum of the chunk's gradients (all taken at the same W_c, so they add token
by token) and applies the update when the chunk fills: the state is constant in sequence length, where the
paper's code runs the whole sequence again at every step.

As the reference (a1600012888/LaCT, lact_llm, the released 760M / 3B configs): RoPE on q', k' with the attention's
rotary and head split (`ttt_nope: true` leaves it out; the paper notes that NoPE also works); Newton-Schulz with the
reference's 5-step coefficient schedule; W0 and W2 start at a rank-`init_rank` product plus 0.5 I with gain
`init_gain` (32 and 0.5 in the 760M / 3B configs; `init_rank: null` gives the full-rank randn / sqrt(fan_in)), W1 at
randn / sqrt(fan_in); the row norms are pinned to their initial values after every update, so the initialisation
sets the fast weights' scale for good. Different on purpose: Newton-Schulz runs in fp32 (the reference casts to bf16;
fp32 is the CPU path, and the schedule is the same); W0 and W2 stay full matrices that the outer loop trains (the
reference keeps them factored, to save parameters against its baselines). W_0, s, b take no weight decay. Padding
tokens are left out of the chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init

from lctk.models.layers import RMSNorm, apply_rotary, silu_grad
from lctk.models.mixers.attention import window_attention
from lctk.models.mixers.base import Mixer, MixerState, require_positive
from lctk.models.mixers.fast_weights import ChunkGrid, pack, unpack
from lctk.models.sequence import SequenceInfo

# LaCT's per-step quintic coefficients (a, b, c): x <- a x + (b x x^T + c (x x^T)^2) x
MUON_SCHEDULE = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


def newton_schulz(g: Tensor) -> Tensor:
    """Approximate U V^T of g = U S V^T for matrices [..., m, n] (Muon's orthogonalisation, LaCT's schedule)."""
    wide = g.shape[-2] <= g.shape[-1]
    x = g if wide else g.transpose(-1, -2)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in MUON_SCHEDULE:
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.transpose(-1, -2)


@dataclass
class LaCTState(MixerState):
    weights: Tensor  # [B, H, P] fast weights W0 | W1 | W2 of the current chunk, fp32
    grads: Tensor  # [B, H, P] the current chunk's update so far
    momentum: Tensor  # [B, H, P] the last applied update before Muon (P = 0 without momentum)
    momentum_sum: Tensor  # [B, H] sum of m_t over the current chunk
    absorbed: Tensor  # [B] tokens of the current document so far
    keys: Tensor  # [B, S, heads, head_dim] the kept window
    values: Tensor
    seen: int = 0


class LaCT(Mixer):
    section = "lact"
    rotary = True
    special_settings = ("init_rank",)  # may be null

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        return "`L` (LaCT) does not run context-parallel yet: its fast weights are not passed from shard to shard"

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        s = self.settings
        self.attn_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_heads = s["num_heads"]
        self.fast_dim = config.hidden_size // self.num_heads
        hidden = self.fast_dim * s["expand"]
        self.shapes = [
            (hidden, self.fast_dim),
            (self.fast_dim, hidden),
            (hidden, self.fast_dim),
        ]  # W0, W1, W2
        self.chunk_size, self.window = s["chunk_size"], s["window"]
        self.use_momentum, self.use_muon = s["momentum"], s["muon"]
        self.base_lr_inv = math.log(math.expm1(s["base_lr"]))  # softplus^-1
        self.rope = not s["ttt_nope"]

        d = config.hidden_size
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.fast_init = nn.Parameter(torch.empty(self.num_heads, sum(r * c for r, c in self.shapes)))
        self.qk_scale = nn.Parameter(torch.empty(2, d))
        self.qk_offset = nn.Parameter(torch.empty(2, d))
        for param in (self.fast_init, self.qk_scale, self.qk_offset):
            param._no_weight_decay = True
        self.lr_proj = nn.Linear(d, 3 * self.num_heads)
        self.momentum_proj = nn.Linear(d, self.num_heads) if self.use_momentum else None
        self.scale_proj = nn.Linear(d, self.num_heads)
        self.fast_norm = RMSNorm(self.fast_dim, eps=config.rms_norm_eps)
        self.init_special_parameters()

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        heads = next(h for h in (4, 2, 1) if config.hidden_size % h == 0)
        return {
            "num_heads": heads,
            "chunk_size": 2048,
            "window": 2048,
            "expand": 1,
            "momentum": True,
            "muon": False,
            "base_lr": 1e-3,
            "ttt_nope": False,
            "init_rank": 32,
            "init_gain": 0.5,
        }

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        if config.hidden_size % settings["num_heads"]:
            raise ValueError(
                f"lact.num_heads: {settings['num_heads']} does not divide hidden_size {config.hidden_size}"
            )
        if config.num_attention_heads * config.head_dim != config.hidden_size:
            raise ValueError(
                "head_dim: LaCT shares q/k/v between attention and fast weights, so num_attention_heads * "
                f"head_dim must equal hidden_size ({config.num_attention_heads} * {config.head_dim} != "
                f"{config.hidden_size})"
            )
        if settings["init_rank"] is not None:  # null: full-rank initial fast weights
            require_positive("lact.init_rank", settings["init_rank"], integer=True)

    @torch.no_grad()
    def init_special_parameters(self) -> None:
        rank, gain = self.settings["init_rank"], self.settings["init_gain"]
        mats = [torch.randn(self.num_heads, rows, cols) / math.sqrt(cols) for rows, cols in self.shapes]
        if rank is not None:  # W0, W2 = L R + 0.5 I, L ~ N(0, gain^2 / rank), R ~ N(0, gain^2 / fan_in)
            for index in (0, 2):
                rows, cols = self.shapes[index]
                left = torch.randn(self.num_heads, rows, rank) * gain / math.sqrt(rank)
                right = torch.randn(self.num_heads, rank, cols) * gain / math.sqrt(cols)
                mats[index] = left @ right + 0.5 * torch.eye(rows, cols)
        init.copy_(self.fast_init, pack(mats))
        init.ones_(self.qk_scale)
        init.zeros_(self.qk_offset)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LaCTState:
        weights = self.fast_init.detach().to(device, self.state_dtype).expand(batch_size, -1, -1).clone()
        window = torch.zeros(batch_size, 0, self.attn_heads, self.head_dim, device=device, dtype=dtype)
        return LaCTState(
            weights=weights,
            grads=torch.zeros_like(weights),
            momentum=torch.zeros_like(weights if self.use_momentum else weights[..., :0]),
            momentum_sum=torch.zeros(batch_size, self.num_heads, device=device),
            absorbed=torch.zeros(batch_size, dtype=torch.long, device=device),
            keys=window,
            values=window.clone(),
        )

    @property
    def state_dtype(self) -> torch.dtype:
        """fp32 fast weights for bf16/fp16 models (fp64 ones stay fp64)."""
        return torch.promote_types(self.fast_init.dtype, torch.float32)

    def state_size(self, seq_len: int) -> int:
        fast = self.fast_init.shape[1] * self.num_heads * (3 if self.use_momentum else 2) + self.num_heads + 1
        return fast + 2 * min(seq_len, self.window - 1) * self.attn_heads * self.head_dim

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: LaCTState | None = None) -> Tensor:
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        cos, sin = seq.rotary
        heads = lambda t: t.unflatten(-1, (self.attn_heads, self.head_dim))  # noqa: E731
        past = (state.keys, state.values, state.seen) if state is not None else None
        attended, (keys, values, seen) = window_attention(
            apply_rotary(heads(q), cos, sin),
            apply_rotary(heads(k), cos, sin),
            heads(v),
            seq,
            self.window,
            past,
        )
        if state is not None:
            state.keys, state.values, state.seen = keys, values, seen

        fast_heads = lambda t: t.unflatten(-1, (self.num_heads, self.fast_dim))  # noqa: E731
        fq = F.normalize(fast_heads(F.silu(q * self.qk_scale[0] + self.qk_offset[0])), dim=-1)
        fk = F.normalize(fast_heads(F.silu(k * self.qk_scale[1] + self.qk_offset[1])), dim=-1)
        if self.rope:  # the attention's rotary on its own head split; rotations keep the fast heads' unit norm
            fq, fk = (fast_heads(apply_rotary(heads(t.flatten(-2)), cos, sin).flatten(-2)) for t in (fq, fk))
        fv = fast_heads(F.silu(v))
        lr = F.softplus(self.lr_proj(hidden_states).to(self.state_dtype) + self.base_lr_inv).unflatten(
            -1, (self.num_heads, 3)
        )
        momentum = (
            torch.sigmoid(self.momentum_proj(hidden_states).to(self.state_dtype))
            if self.use_momentum
            else None
        )
        if seq.token_mask is not None:
            lr = lr * seq.token_mask[:, :, None, None]
        fast = self._fast_weights(fq, fk, fv, lr, momentum, seq, state).to(hidden_states.dtype)
        fast = self.fast_norm(fast) * F.silu(self.scale_proj(hidden_states)).unsqueeze(-1)
        return self.o_proj(attended.flatten(-2) + fast.flatten(-2))

    # ------------------------------------------------------------------------------------------ fast weights

    def _read(self, weights: Tensor, x: Tensor) -> Tensor:
        """f_W(x) for weights [..., H, P] and x [..., H, L, D]."""
        w0, w1, w2 = unpack(weights, self.shapes)
        return (F.silu(x @ w0.transpose(-1, -2)) * (x @ w2.transpose(-1, -2))) @ w1.transpose(-1, -2)

    def _gradient(self, weights: Tensor, k: Tensor, v: Tensor, lr: Tensor) -> Tensor:
        """The gradient of sum_t lr_t <f_W(k_t), v_t> over L tokens (the update direction):
        k, v [..., H, L, D], lr [..., H, L, 3] -> [..., H, P]."""
        w0, w1, w2 = unpack(weights, self.shapes)
        gate, up = k @ w0.transpose(-1, -2), k @ w2.transpose(-1, -2)
        d_hidden = v @ w1  # [..., L, D e]
        lr0, lr1, lr2 = lr.unsqueeze(-1).unbind(-2)
        d_w1 = v.transpose(-1, -2) @ (F.silu(gate) * up * lr1)
        d_w0 = (d_hidden * up * silu_grad(gate)).transpose(-1, -2) @ (k * lr0)
        d_w2 = (d_hidden * F.silu(gate)).transpose(-1, -2) @ (k * lr2)
        return pack([d_w0, d_w1, d_w2])

    def _update(
        self, weights: Tensor, grads: Tensor, momentum: Tensor, momentum_sum: Tensor
    ) -> tuple[Tensor, Tensor]:
        """End of a chunk: (new weights, new momentum)."""
        step = grads
        if self.use_momentum:
            step = momentum = step + momentum * (momentum_sum / self.chunk_size)[..., None]
        if self.use_muon:
            step = pack([newton_schulz(m) for m in unpack(step, self.shapes)])
        mats = unpack(weights + step, self.shapes)
        norms = [m.norm(dim=-1, keepdim=True) for m in unpack(self.fast_init.to(weights.dtype), self.shapes)]
        return pack([m / (m.norm(dim=-1, keepdim=True) + 1e-5) * n for m, n in zip(mats, norms)]), momentum

    def _fast_weights(self, q, k, v, lr, momentum, seq: SequenceInfo, state: LaCTState | None) -> Tensor:
        """q, k, v [B, T, H, D]; lr [B, T, H, 3]; momentum [B, T, H] or None -> outputs [B, T, H, D]
        in the state dtype."""
        batch, length = q.shape[:2]
        if momentum is None:
            momentum = lr.new_zeros(lr.shape[:-1])
        if state is not None and length == 1 and not seq.has_documents:
            return self._fast_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], momentum[:, 0], seq, state).unsqueeze(
                1
            )
        grid = ChunkGrid.build(
            seq, batch, length, self.chunk_size, state.absorbed if state is not None else None, aligned=False
        )
        fresh = self.fast_init.to(self.state_dtype).unsqueeze(0)
        row = lambda name: getattr(state, name) if state is not None else None  # noqa: E731
        weights = grid.initial(row("weights"), fresh)
        grads = grid.initial(row("grads"), torch.zeros_like(fresh))
        moment = grid.initial(
            row("momentum"), torch.zeros_like(fresh if self.use_momentum else fresh[..., :0])
        )
        moment_sum = grid.initial(row("momentum_sum"), fresh.new_zeros(1, self.num_heads))
        completes = grid.completes()
        q, k, v, lr, momentum = (
            grid.to_grid(t.to(fresh.dtype)).transpose(2, 3) for t in (q, k, v, lr, momentum)
        )
        outs = []
        for c in range(grid.shape[1]):
            outs.append(self._read(weights, q[:, c]).transpose(1, 2))
            if state is None and c == grid.shape[1] - 1:
                break  # nothing reads the weights after the last chunk
            grads = grads + self._gradient(weights, k[:, c], v[:, c], lr[:, c])
            moment_sum = moment_sum + momentum[:, c].sum(-1)
            done = completes[:, c, None, None]
            if bool(done.any()):
                new_weights, new_moment = self._update(weights, grads, moment, moment_sum)
                weights = torch.where(done, new_weights, weights)
                moment = torch.where(done, new_moment, moment)
                grads = torch.where(done, 0.0, grads)
                moment_sum = torch.where(done[..., 0], 0.0, moment_sum)
        if state is not None:
            state.weights, state.grads = grid.final(weights), grid.final(grads)
            state.momentum, state.momentum_sum = grid.final(moment), grid.final(moment_sum)
            state.absorbed = grid.absorbed_after(state.absorbed)
        return grid.to_tokens(torch.stack(outs, dim=1), batch, length)

    def _fast_step(self, q, k, v, lr, momentum, seq: SequenceInfo, state: LaCTState) -> Tensor:
        """One token per row: q, k, v [B, H, D]; lr [B, H, 3]; momentum [B, H]."""
        dtype = state.weights.dtype
        out = self._read(state.weights, q.to(dtype).unsqueeze(-2)).squeeze(-2)
        real = (
            seq.token_mask[:, 0]
            if seq.token_mask is not None
            else torch.ones_like(state.absorbed, dtype=torch.bool)
        )
        grads = state.grads + self._gradient(
            state.weights, k.to(dtype).unsqueeze(-2), v.to(dtype).unsqueeze(-2), lr.to(dtype).unsqueeze(-2)
        )
        moment_sum = state.momentum_sum + momentum * real[:, None]
        absorbed = state.absorbed + real.long()
        done = (real & (absorbed % self.chunk_size == 0))[:, None, None]
        if bool(done.any()):
            new_weights, new_moment = self._update(state.weights, grads, state.momentum, moment_sum)
            state.weights = torch.where(done, new_weights, state.weights)
            state.momentum = torch.where(done, new_moment, state.momentum)
            grads, moment_sum = torch.where(done, 0.0, grads), torch.where(done[..., 0], 0.0, moment_sum)
        state.grads, state.momentum_sum, state.absorbed = grads, moment_sum, absorbed
        return out
