"""Causal multi-head attention with RoPE and grouped-query heads: `A` global, `S` sliding window.

    o_t = softmax(q_t K_{<=t}^T / sqrt(d)) V_{<=t}, keys restricted to t - window < s <= t for `S`

Backends: torch SDPA (default), flash-attn when installed and the tensors are on CUDA (otherwise SDPA is used),
and eager (plain softmax with a whole [T, S] mask, for tests and output_attentions). Keys never cross document
boundaries or padding.

Memory is O(T) on every path but eager, whatever the row holds:
- plain causal rows: one SDPA call (is_causal; its CPU and CUDA flash kernels keep no [T, T] tensor);
- packed documents and padding (a whole forward: training, or a first prefill): on a CPU the row is cut into runs
  that attend only among themselves (a document, or a run of padding at its edge) and consecutive runs are grouped
  into spans of up to SPAN_TOKENS tokens: a span of one run is one causal SDPA call, a span of several short runs one
  call with a block-diagonal causal mask of span^2 entries (torch's flex_attention has no CPU backward). On CUDA,
  flash-attn's varlen kernel (cu_seqlens) when installed, else flex_attention with a document BlockMask, compiled;
- sliding windows, padding between a document's real tokens, and a prefill chunk that continues a cache: queries in
  blocks of QUERY_BLOCK (at least the window), each block masked over the keys it can reach (`window_attention`);
- rows split across processes (lctk.parallel.context): `A` all-gathers the keys and values of the group (the Llama 3
  paper's choice: one collective per layer, T/N x 2 H_kv D elements from each rank, no ring schedule); its queries
  see the keys of the shards up to their own, per document span as above; `S` receives only the previous shard's
  last window - 1 keys and values.
A query whose attention is never used (padding) may see other padding: its output differs from the eager path's.

Generation: the keys and values live in an `AttentionState` (transformers' StaticLayer: preallocated, written in
place; a ring of `window` slots for `S`, see lctk.models.cache). A decode step writes its key into the buffer and
reads the filled slots in one SDPA call with the query heads of each key head stacked as query rows ([B, H_kv,
H / H_kv, D]), so no key or value is copied or repeated.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import StaticLayer

from lctk.models.layers import apply_rotary
from lctk.models.mixers.base import Mixer, MixerState, short_shard
from lctk.models.sequence import SequenceInfo

BACKENDS = ("sdpa", "flash", "eager")
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
SPAN_TOKENS = 512  # short documents grouped into one masked call: the mask is at most this squared
QUERY_BLOCK = 256  # queries per masked block (window_attention without a window)
GROWTH_STEP = 64  # tokens: an unsized buffer starts at the first write rounded up to this, then doubles
class AttentionState(StaticLayer, MixerState):
    """Keys and values of one attention layer, written in place; also the layer's MixerState.

    keys, values [B, H_kv, capacity, D] after RoPE; visible [B, capacity] bool: False for padding and for keys of
    documents that have ended (a cache continues each row's last document). `ring`: a sliding window of that many
    tokens; token t lives in slot t % ring, so a decode step writes its key first and then reads every slot (the
    window's ring - 1 earlier keys and its own). Otherwise slot t holds token t, growing by doubling past the
    capacity (`reserve` sets it when the final length is known).
    """

    def __init__(self, ring: int | None = None):
        super().__init__(max_cache_len=ring or 0)
        self.ring = ring
        self.seen = 0  # tokens written so far (a Python int: slices and masks are built from it without a sync)
        self.visible: Tensor | None = None
        self.hidden = False  # some written slot is not visible (then reads need a mask)

    # ------------------------------------------------------------------ StaticLayer / MixerState surface

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if not self.ring and self.max_cache_len < key_states.shape[2]:  # not reserved: the write, rounded up
            self.max_cache_len = -(-key_states.shape[2] // GROWTH_STEP) * GROWTH_STEP
        super().lazy_initialization(key_states, value_states)
        self.visible = torch.ones(self.batch_size, self.max_cache_len, dtype=torch.bool, device=self.device)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` in all (no effect on a ring, or below the current capacity)."""
        if self.ring or tokens <= self.max_cache_len:
            return
        if self.is_initialized:
            self._grow(tokens)
        else:
            self.max_cache_len = tokens

    def tensors(self) -> dict[str, Tensor]:
        """The filled slots (time order for a full buffer, slot order for a ring)."""
        if not self.is_initialized:
            return {}
        filled = self.filled
        return {"keys": self.keys[:, :, :filled], "values": self.values[:, :, :filled],
                "visible": self.visible[:, :filled]}

    def map_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values, self.visible = fn(self.keys), fn(self.values), fn(self.visible)
            self.batch_size = self.keys.shape[0]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    # ------------------------------------------------------------------ writing and reading

    @property
    def filled(self) -> int:
        return min(self.seen, self.ring) if self.ring else self.seen

    def write(self, keys: Tensor, values: Tensor, visible: Tensor | None) -> None:
        """Append L tokens: keys, values [B, L, H_kv, D] (as projected); visible [B, L] bool or None (all)."""
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        length = keys.shape[2]
        if visible is not None and not self.hidden:
            self.hidden = not bool(visible.all())
        if self.ring:
            keep = min(length, self.ring)  # a ring keeps only the last `ring` tokens of a long write
            for lo, hi, slot in self._ring_parts(self.seen + length - keep, keep):
                self._put(slot, keys, values, visible, length - keep + lo, length - keep + hi)
        else:
            if self.seen + length > self.max_cache_len:
                self._grow(max(self.seen + length, 2 * self.max_cache_len))
            self._put(self.seen, keys, values, visible, 0, length)
        self.seen += length
        self.cumulative_length.add_(length)

    def write_token(self, keys: Tensor, values: Tensor, visible: Tensor | None) -> Tensor:
        """One token per row ([B, 1, H_kv, D]) at the slot the `cumulative_length` tensor names, then the mask of
        filled slots over the whole buffer [B or 1, capacity]: no Python int decides a shape or an index, so a
        compiled step keeps one graph and a captured CUDA graph stays valid from token to token."""
        if not self.is_initialized or (not self.ring and self.seen + 1 > self.max_cache_len):
            self.write(keys, values, visible)  # allocate or grow (a new graph), then the same reads
        else:
            slot = self.cumulative_length.remainder(self.ring) if self.ring else self.cumulative_length
            self.keys.index_copy_(2, slot.view(1), keys.transpose(1, 2))
            self.values.index_copy_(2, slot.view(1), values.transpose(1, 2))
            if visible is not None:
                self.hidden = self.hidden or not bool(visible.all())
                self.visible.index_copy_(1, slot.view(1), visible)
            self.seen += 1
            self.cumulative_length.add_(1)
        slots = torch.arange(self.max_cache_len, device=self.device)
        filled = (slots < self.cumulative_length).unsqueeze(0)
        return filled & self.visible if self.hidden else filled

    def _ring_parts(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """(first, last) indices among the kept tokens and the slot the first goes to: one or two runs."""
        slot = start % self.ring
        first = min(count, self.ring - slot)
        return [(0, first, slot)] + ([(first, count, 0)] if first < count else [])

    def _put(self, slot: int, keys: Tensor, values: Tensor, visible: Tensor | None, lo: int, hi: int) -> None:
        """Tokens lo..hi of a write ([B, H_kv, L, D]) into slots from `slot` on."""
        end = slot + hi - lo
        self.keys[:, :, slot:end].copy_(keys[:, :, lo:hi])
        self.values[:, :, slot:end].copy_(values[:, :, lo:hi])
        if visible is not None:
            self.visible[:, slot:end].copy_(visible[:, lo:hi])
        elif self.hidden:
            self.visible[:, slot:end] = True

    def _grow(self, capacity: int) -> None:
        old_keys, old_values, old_visible = self.keys, self.values, self.visible
        self.max_cache_len = capacity
        self.is_initialized = False
        super().lazy_initialization(old_keys[:, :, :0], old_values[:, :, :0])
        self.visible = torch.ones(self.batch_size, capacity, dtype=torch.bool, device=self.device)
        self.keys[:, :, : self.seen].copy_(old_keys[:, :, : self.seen])
        self.values[:, :, : self.seen].copy_(old_values[:, :, : self.seen])
        self.visible[:, : self.seen].copy_(old_visible[:, : self.seen])

    def read(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Every filled slot as views [B, H_kv, S, D] (slot order) and their visibility [B, S] (None: all)."""
        filled = self.filled
        visible = self.visible[:, :filled] if self.hidden else None
        return self.keys[:, :, :filled], self.values[:, :, :filled], visible

    def last(self, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """The last min(count, seen) tokens in time order, [B, S, H_kv, D] and visibility [B, S] (a ring's are
        copied into order; a full buffer's are views)."""
        count = min(count, self.filled)
        if not self.ring:
            parts = [(self.seen - count, self.seen)]
        else:
            parts = [(slot, slot + hi - lo) for lo, hi, slot in self._ring_parts(self.seen - count, count)]
        pieces = [(self.keys[:, :, a:b], self.values[:, :, a:b], self.visible[:, a:b]) for a, b in parts]
        keys, values, visible = (torch.cat(p, dim=-2 if p[0].dim() == 4 else 1) if len(p) > 1 else p[0]
                                 for p in zip(*pieces))
        return keys.transpose(1, 2), values.transpose(1, 2), visible




class Attention(Mixer):
    section = "attention"
    rotary = True
    static_decode = False  # decode steps read the whole buffer under a mask (HybridForCausalLM.compile_decoding)

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
        """Buffers are allocated at the first write (transformers' lazy initialisation: batch, heads, dtype and
        device from the keys), sized by `reserve` when the cache knows its final length."""
        return AttentionState(ring=self.window)

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
            out = self._attend_shard(q, k, v, seq)
        elif state is None or state.seen == 0:
            out = self._attend_fresh(q, k, v, seq)
            if state is not None:
                state.write(k, v, self._visible_after(seq, batch, length, k.device))
        elif length == 1 and self.backend != "eager":
            out = self._decode(q, k, v, seq, state)
        else:
            out = self._attend_cached(q, k, v, seq, state)
        return self.o_proj(out.reshape(batch, length, -1))

    def _attend_fresh(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
        """A forward with nothing cached before it: [B, T, H, D] -> [B, T, H, D]."""
        length = q.shape[1]
        if self.backend == "eager" or torch.compiler.is_exporting():  # export: no spans built from the data
            return self._attend(q, k, v, self._mask(seq, 0, None, length, q.device), causal=length > 1, seq=seq)
        if self.window is not None and length > self.window:
            return window_attention(q, k, v, seq, self.window)[0]
        if seq.has_documents or seq.token_mask is not None:
            return self._attend_documents(q, k, v, seq)
        return self._attend(q, k, v, None, causal=True, seq=seq)

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo, state: AttentionState) -> Tensor:
        """One token per row after the cached ones: write its key and value, then one SDPA call over the filled
        slots, the query heads of each key head as its query rows. With `static_decode` (set by
        HybridForCausalLM.compile_decoding for CUDA graphs) the call reads the whole buffer under a mask of the
        filled slots, so that its shapes never change."""
        batch = q.shape[0]
        if self.static_decode:
            keys, values, mask = state.keys, state.values, state.write_token(k, v, seq.token_mask)
            mask = mask[:, None, None, :]
        else:
            state.write(k, v, seq.token_mask)
            keys, values, visible = state.read()
            mask = None if visible is None else visible[:, None, None, :]
        if mask is not None and state.hidden:  # the new token sees itself even as padding: no empty softmax row
            newest = F.one_hot((state.cumulative_length - 1).remainder(state.max_cache_len), mask.shape[-1])
            mask = mask | newest.bool()
        grouped = q.view(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(grouped, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return out.view(batch, 1, self.num_heads, self.head_dim)

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo, state: AttentionState) -> Tensor:
        """Tokens that continue a non-empty cache: a prefill chunk, or any call on the eager backend."""
        batch, length = q.shape[:2]
        seen = state.seen
        past_keys, past_values, past_visible = state.last(seen if self.window is None else self.window - 1)
        past_keys, past_values = past_keys.to(q.dtype), past_values.to(q.dtype)
        if self.backend == "eager":
            keys, values = torch.cat([past_keys, k], dim=1), torch.cat([past_values, v], dim=1)
            out = self._attend(q, keys, values, self._mask(seq, seen, past_visible, length, q.device),
                               causal=False, seq=seq)
        else:
            new_visible = seq.token_mask if seq.token_mask is not None else past_visible.new_ones(batch, length)
            visible = replace(seq, key_mask=torch.cat([past_visible, new_visible], dim=1))
            out, _ = window_attention(q, k, v, visible, self.window, past=(past_keys, past_values, seen))
        state.write(k, v, self._visible_after(seq, batch, length, k.device))
        return out

    @staticmethod
    def _visible_after(seq: SequenceInfo, batch: int, length: int, device: torch.device) -> Tensor | None:
        """Which of this call's keys later calls may see (None: all): not padding, and in the row's last document."""
        if seq.token_mask is None and not seq.has_documents:
            return None
        visible = torch.ones(batch, length, dtype=torch.bool, device=device)
        if seq.token_mask is not None:
            visible = visible & seq.token_mask
        if seq.has_documents:
            visible = visible & (seq.seq_idx == seq.seq_idx[:, -1:])
        return visible

    def _mask(
        self, seq: SequenceInfo, seen: int, past_visible: Tensor | None, length: int, device: torch.device
    ) -> Tensor | None:
        """The eager path's boolean [B or 1, 1, T, S] (True = attend), or None when plain causal attention is
        exact."""
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

    def _attend_documents(self, q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
        """Packed documents and/or padding, nothing cached: [B, T, H, D] -> [B, T, H, D] in O(T) memory."""
        if q.is_cuda:
            if self.backend == "flash" and FLASH_ATTN_INSTALLED and seq.token_mask is None:
                from flash_attn import flash_attn_varlen_func

                lengths = seq.cu_seqlens.diff()
                flat = [t.flatten(0, 1) for t in (q, k, v)]
                out = flash_attn_varlen_func(*flat, seq.cu_seqlens, seq.cu_seqlens, int(lengths.max()),
                                             int(lengths.max()), causal=True)
                return out.view(q.shape)
            return flex_document_attention(q, k, v, seq)
        runs = seq.attention_runs
        if runs is None:  # padding between real tokens of a document: masked blocks of queries
            return window_attention(q, k, v, seq, None)[0]
        spans = [group_runs(row, SPAN_TOKENS) for row in runs]
        out = span_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), spans)
        return out.transpose(1, 2)

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
        if self.backend == "eager" or shard.documents is None:
            mask = None
            if shard.documents is not None:
                docs = shard.documents
                causal = torch.arange(shard.start, shard.stop, device=q.device)[:, None] >= torch.arange(
                    shard.stop, device=q.device)
                mask = (causal & (docs[:, shard.start : shard.stop, None] == docs[:, None, : shard.stop])).unsqueeze(1)
            return self._attend(q, keys, values, mask, causal=True, seq=seq)
        # per row: the span of the document the shard starts in (its keys may begin in an earlier shard), then the
        # shard's own documents grouped as in a whole row
        spans = [shard_spans(row, shard.start, shard.stop, SPAN_TOKENS) for row in shard.document_runs]
        out = span_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), spans, shard.start)
        return out.transpose(1, 2)

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
        elif causal and mask is None and q.shape[2] != k.shape[2]:
            out = lower_right_causal(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                 enable_gqa=True)
        return out.transpose(1, 2)


def lower_right_causal(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last Tq of Tk positions: q [B, H, Tq, D], k/v [B, H_kv, Tk, D] (Tq <= Tk). On a CPU,
    where torch has no lower-right kernel (CausalBias would build the [Tq, Tk] mask), zero queries in front make it
    top-left causal: O(T) memory, at the cost of the rows in front."""
    gap = k.shape[2] - q.shape[2]
    if gap == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                              enable_gqa=True)
    padded = F.pad(q, (0, 0, gap, 0))
    return F.scaled_dot_product_attention(padded, k, v, is_causal=True, enable_gqa=True)[:, :, gap:]


Span = tuple[int, int, int, list[int] | None]  # queries [lo, hi), keys [key_lo, hi), run lengths of a grouped span


def group_runs(runs: list[tuple[int, int]], limit: int) -> list[Span]:
    """Consecutive runs (start, end) of one row -> spans: runs are grouped while the group stays within `limit`
    tokens (one masked call for many short documents); a longer run is a span of its own (one causal call)."""
    spans: list[Span] = []
    group: list[tuple[int, int]] = []
    for start, end in [*runs, (None, None)]:
        if group and (start is None or end - group[0][0] > limit):
            lengths = [b - a for a, b in group] if len(group) > 1 else None
            spans.append((group[0][0], group[-1][1], group[0][0], lengths))
            group = []
        if start is not None:
            group.append((start, end))
    return spans


def shard_spans(runs: list[tuple[int, int]], start: int, stop: int, limit: int) -> list[Span]:
    """Spans of a shard's queries [start, stop) given the row's document runs up to `stop`: the document the shard
    starts in sees its keys from the document's start (lower-right causal), the documents after it are grouped as in
    a whole row."""
    first = next(i for i, (a, b) in enumerate(runs) if a <= start < b)
    doc_start, doc_end = runs[first]
    inside = [(a, b) for a, b in runs[first + 1 :]]
    return [(start, doc_end, doc_start, None)] + group_runs(inside, limit)


def span_attention(q: Tensor, k: Tensor, v: Tensor, spans: list[list[Span]], query_offset: int = 0) -> Tensor:
    """q [B, H, T, D] at positions query_offset + t, k/v [B, H_kv, S, D] -> [B, H, T, D]. spans[b] covers row b's
    queries in order; a span's queries see its keys causally (its queries are the last of its keys) and, when it
    groups runs, only the keys of their own run (a block-diagonal causal mask)."""
    rows = []
    for b, row in enumerate(spans):
        outs = []
        for lo, hi, key_lo, lengths in row:
            qs = q[b : b + 1, :, lo - query_offset : hi - query_offset]
            ks, vs = k[b : b + 1, :, key_lo:hi], v[b : b + 1, :, key_lo:hi]
            if lengths is not None:
                mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool, device=q.device).tril() for n in lengths])
                outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True))
            else:
                outs.append(lower_right_causal(qs, ks, vs))
        rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    return torch.cat(rows) if len(rows) > 1 else rows[0]


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, seq: SequenceInfo) -> Tensor:
    """Documents and padding through flex_attention's block-sparse kernel ([B, T, H, D] in and out): compiled on
    CUDA; elsewhere torch's unfused reference (forward only: the tests check the mask with it)."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if q.is_cuda else flex_attention
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=seq.document_block_mask,
                 enable_gqa=True)
    return out.transpose(1, 2)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq: SequenceInfo,
    window: int | None,
    past: tuple[Tensor, Tensor, int] | None = None,
    persistent: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, int]]:
    """Causal attention where query t sees keys t - window < s <= t of its own document (every earlier key of it when
    window is None), and not padding.

    q, k, v [B, T, H, D] after RoPE; past = (keys, values, seen): the kept keys/values [B, S, H, D] of the
    `seen` earlier tokens (S <= window - 1); persistent [2, P, H, D] learned keys and values every query sees.
    Returns (out [B, T, H, D], the past for the next call: the last window - 1 keys, or all without a window).
    Queries go in blocks of max(window, 64) (QUERY_BLOCK without a window), each over the keys it can reach with its
    own mask, so memory stays O(T x window); without a window a block's mask is QUERY_BLOCK x S, recomputed in
    backward rather than kept.
    """
    batch, length = q.shape[:2]
    past_keys, past_values, seen = past if past is not None else (k[:, :0], v[:, :0], 0)
    kept = past_keys.shape[1]
    keys = torch.cat([past_keys.to(k.dtype), k], dim=1)
    values = torch.cat([past_values.to(v.dtype), v], dim=1)
    key_ok = seq.key_mask[:, -(kept + length) :] if seq.key_mask is not None else None
    # cached keys belong to the row's first document
    key_doc = F.pad(seq.seq_idx, (kept, 0), value=0) if seq.has_documents else None
    block = max(window, 64) if window is not None else QUERY_BLOCK
    recompute = window is None and torch.is_grad_enabled() and q.requires_grad
    outs = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        lo, hi = (0 if window is None else max(0, kept + start - window + 1)), kept + stop
        parts = (
            q[:, start:stop], keys[:, lo:hi], values[:, lo:hi],
            None if key_ok is None else key_ok[:, lo:hi],
            None if key_doc is None else (seq.seq_idx[:, start:stop], key_doc[:, lo:hi]),
        )
        if recompute:
            outs.append(checkpoint(_masked_block, *parts, kept + start, lo, window, persistent, use_reentrant=False))
        else:
            outs.append(_masked_block(*parts, kept + start, lo, window, persistent))
    drop = 0 if window is None else keys.shape[1] - min(keys.shape[1], window - 1)
    return torch.cat(outs, dim=1), (keys[:, drop:], values[:, drop:], seen + length)


def _masked_block(q, keys, values, key_ok, docs, first_query: int, first_key: int, window, persistent) -> Tensor:
    """A block of queries [B, Q, H, D] (positions first_query + i) over keys [B, S, H, D] (first_key + j)."""
    distance = (torch.arange(q.shape[1], device=q.device) + first_query)[:, None] - (
        torch.arange(keys.shape[1], device=q.device) + first_key)
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed.unsqueeze(0)
    if key_ok is not None:
        allowed = allowed & key_ok[:, None, :]
    if docs is not None:
        allowed = allowed & (docs[0][:, :, None] == docs[1][:, None, :])
    allowed = allowed | (distance == 0)  # a padding query sees itself: no empty softmax row
    if persistent is not None:
        batch = q.shape[0]
        keys = torch.cat([persistent[0].to(keys.dtype).expand(batch, -1, -1, -1), keys], dim=1)
        values = torch.cat([persistent[1].to(values.dtype).expand(batch, -1, -1, -1), values], dim=1)
        allowed = F.pad(allowed, (persistent.shape[1], 0), value=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=allowed.unsqueeze(1), enable_gqa=True)
    return out.transpose(1, 2)
