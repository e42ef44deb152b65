"""What every mixer needs to know about the tokens of one forward call besides their hidden states: positions,
document boundaries of packed rows, and padding.

Documents: position_ids that restart at 0 inside a row start a new document (the convention of transformers'
DataCollatorWithFlattening), or `cu_seqlens` over a batch of one row. A forward call that continues a cache
continues the cached document with its first tokens: a cache holds one document per row.
Padding: a 2D attention_mask (1 = token, 0 = pad) covering the cached tokens and the new ones, as generate() passes.
Context parallelism: `shard` (a `Shard`, implemented by lctk.parallel.context.ContextShard) says which part of the
full rows this call holds; position_ids are those of the full rows, so a shard whose first position is not 0
continues the previous shard's document. Mixers ask the shard for what they need from the other ranks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Shard(Protocol):
    """What mixers ask of this process's shard of rows split across processes. The models own this surface;
    lctk.parallel.context.ContextShard implements it (with the process group), so the models import nothing above
    them."""

    rank: int
    start: int  # the shard is tokens [start, stop) of every row
    stop: int
    documents: Tensor | None  # [B, T] document index of every token of the full rows; None: one document per row

    def document_runs(self) -> list[list[tuple[int, int]]]: ...

    def all_gather(self, x: Tensor, tag: str) -> Tensor: ...

    def from_previous(self, x: Tensor, tag: str) -> Tensor: ...

    def previous_visible(self, count: int) -> Tensor: ...

    def conv_halo(self, x: Tensor, kernel: int, seq_idx: Tensor | None, tag: str) -> Tensor: ...

    def carry_ssd_states(self, out: Tensor, q: Tensor, g: Tensor | None, final: Tensor, seq_idx: Tensor | None,
                         tag: str) -> Tensor: ...

    def carry_affine_states(self, out: Tensor, readout: Tensor, final: Tensor, transition: Tensor,
                            seq_idx: Tensor | None, tag: str) -> Tensor: ...


@dataclass
class SequenceInfo:
    position_ids: Tensor  # [B, T] positions for RoPE
    seq_idx: Tensor | None = None  # [B, T] document index inside each row, from 0; None = one document per row
    token_mask: Tensor | None = None  # [B, T] bool, False at padding; None = no padding in this call
    key_mask: Tensor | None = None  # [B, past + T] bool over the whole history, False at padding
    cu_seqlens: Tensor | None = None  # [N + 1] document offsets over the flattened B*T tokens (None without documents)
    first_doc: Tensor | None = None  # [B] index (among the N documents) of each row's first document
    last_doc: Tensor | None = None  # [B] index of each row's last document
    rotary: tuple[Tensor, Tensor] | None = None  # cos, sin [B, T, head_dim], computed once per forward
    shard: Shard | None = None  # this call's shard of rows split across processes; None: whole rows
    attentions: dict[int, Tensor] | None = None  # output_attentions: layer -> weights [B, H, T, S] of eager attention
    recompute_segment: int | None = None  # training: layers that can recompute a long row in segments of this many tokens

    @property
    def has_documents(self) -> bool:
        return self.seq_idx is not None

    @functools.cached_property
    def attention_runs(self) -> list[list[tuple[int, int]]] | None:
        """Per row, the runs (start, end) of tokens that attend only among themselves: each document, its padding
        at its start or end as runs of their own (what a padding query sees does not matter). None when a document
        has padding between real tokens (those on both sides see each other: a mask is needed). Computed once per
        forward, for every attention layer."""
        batch, length = self.position_ids.shape
        docs = self.seq_idx if self.seq_idx is not None else self.position_ids.new_zeros(batch, length)
        real = self.token_mask if self.token_mask is not None else torch.ones_like(docs, dtype=torch.bool)
        new_doc = F.pad(docs[:, 1:] != docs[:, :-1], (1, 0), value=True)
        real_starts = real & (new_doc | ~F.pad(real[:, :-1], (1, 0), value=False))
        rows, cols = torch.nonzero(real_starts, as_tuple=True)
        doc_of = docs[rows, cols]  # documents are in order along a row: a repeat is the next real run
        if bool(((rows[1:] == rows[:-1]) & (doc_of[1:] == doc_of[:-1])).any()):
            return None
        return runs_of(docs * 2 + real.long())

    @functools.cached_property
    def document_block_mask(self):
        """flex_attention's BlockMask of causal attention inside documents, padding keys hidden (a padding query
        sees itself), built once per forward."""
        from torch.nn.attention.flex_attention import create_block_mask

        batch, length = self.position_ids.shape
        docs = self.seq_idx if self.seq_idx is not None else self.position_ids.new_zeros(batch, length)
        real = self.token_mask if self.token_mask is not None else torch.ones_like(docs, dtype=torch.bool)

        def allowed(b, h, q, k):
            return (k <= q) & (docs[b, q] == docs[b, k]) & (real[b, k] | (q == k))

        return create_block_mask(allowed, batch, None, length, length, device=docs.device)

    def flat_initial_states(self, row_states: Tensor | None) -> Tensor | None:
        """Per-row states [B, ...] -> per-document states [N, ...]: each row's first document continues the row's
        state, the others start from zero."""
        if row_states is None:
            return None
        states = row_states.new_zeros(len(self.cu_seqlens) - 1, *row_states.shape[1:])
        states[self.first_doc] = row_states
        return states

    def segment(self, part: slice) -> SequenceInfo:
        """Tokens `part` of whole rows without padding, as a call that continues a cache holding the tokens before
        them (its first document continues the row's carried state: a caller resets that state where a document
        starts at part.start)."""
        assert self.token_mask is None and self.shard is None, "segments of padded or split rows are not supported"
        positions = self.position_ids[:, part]
        info = build_sequence_info(positions.shape[0], positions.shape[1], part.start, positions.device, positions)
        if self.rotary is not None:
            info.rotary = tuple(table[:, part] for table in self.rotary)
        return info

    def row_final_states(self, doc_states: Tensor) -> Tensor:
        """Per-document final states [N, ...] -> the state each row ends with [B, ...]."""
        return doc_states[self.last_doc]


def runs_of(ids: Tensor) -> list[list[tuple[int, int]]]:
    """[B, T] -> per row, the (start, end) of each run of equal consecutive values."""
    batch, length = ids.shape
    changes = torch.nonzero(ids[:, 1:] != ids[:, :-1]).tolist()
    cuts: list[list[int]] = [[0] for _ in range(batch)]
    for row, t in changes:
        cuts[row].append(t + 1)
    return [list(zip(row, row[1:] + [length])) for row in cuts]


def document_index(position_ids: Tensor) -> Tensor | None:
    """[B, T] index of each token's document inside its row (a position 0 after the first token starts one), or None
    when no row has a restart."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return None
    return torch.cat([torch.zeros_like(position_ids[:, :1]), restarts.long().cumsum(1)], dim=1)


def build_sequence_info(
    batch: int,
    length: int,
    past_length: int,
    device: torch.device,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    shard: Shard | None = None,
) -> SequenceInfo:
    key_mask = token_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            raise ValueError(f"attention_mask: expected [batch, past + length], got {tuple(attention_mask.shape)}")
        if attention_mask.shape[1] < past_length + length:  # which cached tokens it omits cannot be known
            raise ValueError(
                f"attention_mask: covers {attention_mask.shape[1]} tokens, fewer than the {past_length} in the cache + "
                f"{length} new ones (pass the mask of the whole sequence, cached tokens included)"
            )
        key_mask = attention_mask[:, -(past_length + length) :].bool()
        # an all-ones mask is dropped (the unmasked kernels are faster); torch.export cannot branch on its values, so
        # an exported forward keeps it
        if not torch.compiler.is_exporting() and bool(key_mask.all()):
            key_mask = None
        else:
            token_mask = key_mask[:, -length:]

    seq_idx = None
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError("cu_seqlens: needs a batch of one packed row")
        starts = torch.zeros(length, dtype=torch.long, device=device)
        starts[cu_seqlens[1:-1].long()] = 1
        seq_idx = starts.cumsum(0).unsqueeze(0)
        if position_ids is None:
            offsets = torch.arange(length, device=device) - cu_seqlens.long()[seq_idx[0]]
            position_ids = offsets.unsqueeze(0)
    elif position_ids is not None:
        seq_idx = document_index(position_ids)

    if position_ids is None:
        if attention_mask is not None:
            full = attention_mask.long().cumsum(-1) - 1
            position_ids = full.clamp(min=0)[:, -length:]
        else:
            position_ids = torch.arange(past_length, past_length + length, device=device).expand(batch, -1)

    info = SequenceInfo(position_ids=position_ids, seq_idx=seq_idx, token_mask=token_mask, key_mask=key_mask,
                        shard=shard)
    if seq_idx is not None:
        docs_per_row = seq_idx[:, -1] + 1
        info.last_doc = docs_per_row.cumsum(0) - 1
        info.first_doc = info.last_doc - docs_per_row + 1
        flat_starts = torch.cat([torch.ones_like(seq_idx[:, :1]), (seq_idx[:, 1:] != seq_idx[:, :-1]).long()], 1)
        boundaries = torch.nonzero(flat_starts.flatten()).flatten()
        info.cu_seqlens = torch.cat([boundaries, boundaries.new_tensor([batch * length])]).to(torch.int32)
    return info
