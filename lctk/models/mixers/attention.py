"""Causal multi-head attention with RoPE and grouped-query heads: `A` global, `S` sliding window.

    o_t = softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t}, keys restricted to t - window < s <= t for `S`

Backends: torch SDPA (default), flash-attn when installed and the tensors are on CUDA (otherwise SDPA is used),
and eager (plain softmax, for tests). Keys never cross document boundaries or padding. The sliding-window cache
keeps only the last window - 1 keys, so `S` has a bounded state like the recurrent mixers.

Rows split across processes (lctk.parallel.context): `A` all-gathers the keys and values of the group (the Llama 3
paper's choice: one collective per layer, T/N x 2 H_kv D elements from each rank, no ring schedule) and its queries
see the keys of the shards up to their own, causally shifted by the shard's start; `S` receives only the previous
shard's last window - 1 keys and values.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right

from lctk.models.layers import apply_rotary
from lctk.models.mixers.base import Mixer, MixerState, short_shard
from lctk.models.sequence import SequenceInfo

BACKENDS = ("sdpa", "flash", "eager")
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


@dataclass
class AttentionState(MixerState):
    keys: Tensor  # [B, S_kept, H_kv, D] after RoPE
    values: Tensor
    visible: Tensor  # [B, S_kept] bool: False for padding and for keys of documents that have ended
    seen: int = 0  # tokens seen so far; the kept keys are the last S_kept of them


class Attention(Mixer):
    section = "attention"
    rotary = True

    def __init__(self, config, letter: str):
        super().__init__(config, letter)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = self.settings["window"] if letter == "S" else None
        self.config = config  # transformers' attn_implementation lives there and may change (set_attn_implementation)
        bias = self.settings["qkv_bias"]
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=self.settings["o_bias"])

    @property
    def backend(self) -> str:
        """transformers' attn_implementation mapped onto the backends: "eager" and "flash_attention_*" choose eager and
        flash; "sdpa" (also transformers' default) keeps attention.backend's choice of sdpa or flash."""
        chosen = self.config._attn_implementation or "sdpa"
        if chosen == "eager" or "flash" in chosen:
            return "eager" if chosen == "eager" else "flash"
        return "flash" if self.settings["backend"] == "flash" else "sdpa"

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        return {"window": 512, "backend": "sdpa", "qkv_bias": False, "o_bias": False}

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        if settings["backend"] not in BACKENDS:
            raise ValueError(f"attention.backend: {settings['backend']!r} is not one of {', '.join(BACKENDS)}")

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        if "S" not in config.pattern:
            return None
        return short_shard("S", config.attention["window"] - 1, "attention.window - 1", shard_length)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        empty = torch.zeros(batch_size, 0, self.num_kv_heads, self.head_dim, device=device, dtype=dtype)
        visible = torch.ones(batch_size, 0, dtype=torch.bool, device=device)
        return AttentionState(keys=empty, values=empty.clone(), visible=visible)

    def state_size(self, seq_len: int) -> int:
        kept = seq_len if self.window is None else min(seq_len, self.window - 1)
        return 2 * self.num_kv_heads * self.head_dim * kept

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: AttentionState | None = None) -> Tensor:
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        cos, sin = seq.rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if seq.shard is not None:
            return self.o_proj(self._attend_shard(q, k, v, seq).reshape(batch, length, -1))
        if state is None and self.window is not None and length > self.window and self.backend == "sdpa":
            # queries in blocks: O(T x window) time and memory instead of a T x T mask
            out, _ = window_attention(q, k, v, seq, self.window)
            return self.o_proj(out.reshape(batch, length, -1))

        seen, kept, past_visible = 0, 0, None
        if state is not None:
            seen, kept, past_visible = state.seen, state.keys.shape[1], state.visible
            k = torch.cat([state.keys, k.to(state.keys.dtype)], dim=1)
            v = torch.cat([state.values, v.to(state.values.dtype)], dim=1)
            visible = torch.cat([past_visible, self._visible_after(seq, batch, length, k.device)], dim=1)
            drop = 0 if self.window is None else max(0, k.shape[1] - (self.window - 1))
            state.keys, state.values, state.visible = k[:, drop:], v[:, drop:], visible[:, drop:]
            state.seen = seen + length

        mask = self._mask(seq, seen, past_visible, length, k.device)
        out = self._attend(q, k.to(q.dtype), v.to(q.dtype), mask, causal=kept == 0 and length > 1, seq=seq)
        return self.o_proj(out.reshape(batch, length, -1))

    @staticmethod
    def _visible_after(seq: SequenceInfo, batch: int, length: int, device: torch.device) -> Tensor:
        """Which of this call's keys later calls may see: not padding, and in the row's last document."""
        visible = torch.ones(batch, length, dtype=torch.bool, device=device)
        if seq.token_mask is not None:
            visible = visible & seq.token_mask
        if seq.has_documents:
            visible = visible & (seq.seq_idx == seq.seq_idx[:, -1:])
        return visible

    def _mask(
        self, seq: SequenceInfo, seen: int, past_visible: Tensor | None, length: int, device: torch.device
    ) -> Tensor | None:
        """Boolean [B or 1, 1, T, S] (True = attend), or None when plain causal attention is exact."""
        kept = 0 if past_visible is None else past_visible.shape[1]
        windowed = self.window is not None and seen + length > self.window
        hidden_past = past_visible is not None and not bool(past_visible.all())
        plain = seq.key_mask is None and not seq.has_documents and not windowed and not hidden_past
        if plain and (kept == 0 or length == 1):
            return None
        query_at = torch.arange(seen, seen + length, device=device)
        key_at = torch.arange(seen - kept, seen + length, device=device)
        distance = query_at[:, None] - key_at[None, :]
        allowed = distance >= 0
        if self.window is not None:
            allowed = allowed & (distance < self.window)
        allowed = allowed.unsqueeze(0)
        if seq.key_mask is not None:
            allowed = allowed & seq.key_mask[:, -(kept + length) :].unsqueeze(1)
        if hidden_past:
            allowed = allowed & F.pad(past_visible, (0, length), value=True).unsqueeze(1)
        if seq.has_documents:
            key_doc = F.pad(seq.seq_idx, (kept, 0), value=0)  # cached keys belong to the first document
            allowed = allowed & (seq.seq_idx.unsqueeze(2) == key_doc.unsqueeze(1))
        # a padded query sees itself, so that no softmax row is empty (its output is never used)
        allowed = allowed | (distance == 0).unsqueeze(0)
        return allowed.unsqueeze(1)

    def _attend_shard(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
        """This shard's queries [B, T/N, H, D] over the keys they see in the whole rows."""
        shard = seq.shard
        batch, length = q.shape[:2]
        if self.window is not None:
            kept = self.window - 1
            halo = shard.from_previous(torch.cat([k[:, -kept:], v[:, -kept:]], dim=-1), tag="S kv")
            past_keys, past_values = halo.split(self.head_dim, dim=-1)
            ones = torch.ones(batch, length, dtype=torch.bool, device=q.device)
            visible = replace(seq, key_mask=torch.cat([shard.previous_visible(kept), ones], dim=1))
            out, _ = window_attention(q, k, v, visible, self.window, past=(past_keys, past_values, 0))
            return out
        gathered = shard.all_gather(torch.cat([k, v], dim=-1), tag="A kv")  # [N, B, T/N, H_kv, 2 D]
        keys, values = gathered[: shard.rank + 1].transpose(0, 1).flatten(1, 2).split(self.head_dim, dim=-1)
        if shard.documents is not None:
            queries_at = torch.arange(shard.start, shard.stop, device=q.device)
            causal = queries_at[:, None] >= torch.arange(shard.stop, device=q.device)
            docs = shard.documents
            mask = (causal & (docs[:, shard.start : shard.stop, None] == docs[:, None, : shard.stop])).unsqueeze(1)
            return self._attend(q, keys, values, mask, causal=True, seq=seq)
        if q.is_cuda or self.backend == "eager":
            return self._attend(q, keys, values, None, causal=True, seq=seq)
        # torch has no lower-right causal kernel on CPU (CausalBias would materialise a [T/N, T] mask): zero queries
        # in front make it top-left causal, O(T) memory like the gathered keys, at the cost of computing the rows of
        # the earlier shards too (CPU is the test platform; GPUs take the flash path above)
        padded = F.pad(q, (0, 0, 0, 0, shard.start, 0))
        return self._attend(padded, keys, values, None, causal=True, seq=seq)[:, shard.start :]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, seq: SequenceInfo) -> Tensor:
        """q [B, T, H, D], k/v [B, S, H_kv, D] -> [B, T, H, D]. causal: the queries are the last T of the S
        positions (lower-right alignment, as flash-attn's)."""
        if self.backend == "flash" and FLASH_ATTN_INSTALLED and q.is_cuda and mask is None and self.window is None:
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, causal=causal)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.backend == "eager":
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            if mask is None and causal:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1).to(v.dtype)
            if seq.attentions is not None:
                seq.attentions[self.layer_idx] = weights
            out = weights @ v
        else:
            if causal and mask is None and q.shape[2] != k.shape[2]:
                mask = causal_lower_right(q.shape[2], k.shape[2])  # SDPA's is_causal aligns top-left
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=True)
        return out.transpose(1, 2)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq: SequenceInfo,
    window: int,
    past: tuple[Tensor, Tensor, int] | None = None,
    persistent: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, int]]:
    """Causal attention where query t sees keys t - window < s <= t of its own document (and not padding).

    q, k, v [B, T, H, D] after RoPE; past = (keys, values, seen): the kept keys/values [B, S, H, D] of the
    `seen` earlier tokens (S <= window - 1); persistent [2, P, H, D] learned keys and values every query sees.
    Returns (out [B, T, H, D], the past for the next call). Queries go in blocks of `window` so memory stays
    O(T * window) rather than O(T^2).
    """
    batch, length = q.shape[:2]
    past_keys, past_values, seen = past if past is not None else (k[:, :0], v[:, :0], 0)
    kept = past_keys.shape[1]
    keys = torch.cat([past_keys.to(k.dtype), k], dim=1)
    values = torch.cat([past_values.to(v.dtype), v], dim=1)
    key_ok = seq.key_mask[:, -(kept + length) :] if seq.key_mask is not None else None
    # cached keys belong to the row's first document
    key_doc = F.pad(seq.seq_idx, (kept, 0), value=0) if seq.has_documents else None
    block = max(window, 64)
    outs = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        lo, hi = max(0, kept + start - window + 1), kept + stop
        distance = (torch.arange(start, stop, device=q.device) + kept)[:, None] - torch.arange(
            lo, hi, device=q.device
        )
        allowed = ((distance >= 0) & (distance < window)).unsqueeze(0)
        if key_ok is not None:
            allowed = allowed & key_ok[:, None, lo:hi]
        if key_doc is not None:
            allowed = allowed & (seq.seq_idx[:, start:stop, None] == key_doc[:, None, lo:hi])
        allowed = allowed | (distance == 0)  # a padding query sees itself: no empty softmax row
        block_keys, block_values = keys[:, lo:hi], values[:, lo:hi]
        if persistent is not None:
            block_keys = torch.cat([persistent[0].to(k.dtype).expand(batch, -1, -1, -1), block_keys], dim=1)
            block_values = torch.cat(
                [persistent[1].to(v.dtype).expand(batch, -1, -1, -1), block_values], dim=1
            )
            allowed = F.pad(allowed, (persistent.shape[1], 0), value=True)
        out = F.scaled_dot_product_attention(
            q[:, start:stop].transpose(1, 2),
            block_keys.transpose(1, 2),
            block_values.transpose(1, 2),
            attn_mask=allowed.unsqueeze(1),
            enable_gqa=True,
        )
        outs.append(out.transpose(1, 2))
    keep = keys.shape[1] - min(keys.shape[1], window - 1)
    return torch.cat(outs, dim=1), (keys[:, keep:], values[:, keep:], seen + length)
