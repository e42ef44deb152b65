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
import math
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lctk.kernels.ssd import ssd


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


def ssd_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    seq: SequenceInfo,
    initial: Tensor | None,
    chunk_size: int,
    tag: str = "ssd state",
) -> tuple[Tensor, Tensor | None]:
    """`ssd` over the rows of one forward call; packed documents run as one flat row restarting at each
    boundary.
    initial: the per-row state to continue, or None (then no final state is returned).
    A shard of split rows runs from a zero state and gets the earlier shards' state from the group
    (ContextShard.carry_ssd_states); `tag` names the layer type in the count of bytes sent."""
    if seq.shard is not None:
        zero = v.new_zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1], dtype=torch.float32)
        out, final = ssd_rows(q, k, v, g, replace(seq, shard=None), zero, chunk_size)
        return seq.shard.carry_ssd_states(out, q, g, final, seq.seq_idx, tag), None
    want_final = initial is not None
    if not seq.has_documents:
        return ssd(q, k, v, g, initial_state=initial, output_final_state=want_final, chunk_size=chunk_size)
    flat = [None if t is None else t.flatten(0, 1).unsqueeze(0) for t in (q, k, v, g)]
    out, final = ssd(
        *flat,
        initial_state=seq.flat_initial_states(initial),
        output_final_state=want_final,
        cu_seqlens=seq.cu_seqlens,
        chunk_size=chunk_size,
    )
    return out.view(v.shape), seq.row_final_states(final) if want_final else None


def recurrent_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor) -> Tensor:
    """One decoding step of the SSD recurrence with the state updated in place (no autograd): S <- exp(g) S + k v^T,
    o = q^T S. q, k [B, Hk, K] (each shared by H / Hk heads); v [B, H, V]; g [B, H] or None; state [B, H, K, V] fp32.
    Returns o [B, H, V] in v's dtype. The same arithmetic as lctk.kernels.ssd.ssd_step, in three ops on the state
    (scale, rank-one add, read) rather than building a new one."""
    batch, heads, key_dim, value_dim = state.shape
    groups = k.shape[1]
    # heads of a group side by side: [B, G, H / G, K, V], so that q and k broadcast over them (nothing repeated)
    grouped = state.view(batch, groups, heads // groups, key_dim, value_dim)
    if g is not None:
        grouped.mul_(torch.exp(g.float()).view(batch, groups, heads // groups, 1, 1))
    grouped.addcmul_(k.float()[:, :, None, :, None], v.float().view(batch, groups, heads // groups, 1, value_dim))
    out = torch.matmul(q.float()[:, :, None, None, :], grouped)  # [B, G, H / G, 1, V]
    return out.view(batch, heads, value_dim).to(v.dtype)


@dataclass
class ChunkGrid:
    """The real tokens of a [B, T] call laid out as a grid [N, C, W] (N sequences, C chunks, W slots).

    A sequence is one document of a row; the first document of row b continues the row's cached state, where
    `phase` slots of its current chunk are already used. Aligned grids put a token at slot
    (phase + rank) % chunk (Titans: order inside a chunk matters); compact grids start each sequence's first
    chunk at slot 0 (LaCT: only chunk membership matters), which keeps short calls narrow. Empty slots hold
    zeros and are not `live`.
    """

    token_index: Tensor  # [M] flat B*T index of every real token
    grid_index: Tensor  # [M] flat N*C*W index of the same tokens
    shape: tuple[int, int, int]  # N, C, W
    chunk_size: int
    first_seq: Tensor  # [B] the sequence each row starts with (it continues the row's state)
    last_seq: Tensor  # [B] the sequence each row ends with (its state is the row's next state)
    phase: Tensor  # [N] slots of the first chunk filled by earlier calls
    counts: Tensor  # [N] real tokens of each sequence in this call

    @classmethod
    def build(
        cls,
        seq: SequenceInfo,
        batch: int,
        length: int,
        chunk_size: int,
        absorbed: Tensor | None,
        aligned: bool,
    ):
        """absorbed: [B] tokens of each row's current document seen by earlier calls, or None (fresh rows)."""
        device = seq.position_ids.device
        valid = (
            seq.token_mask
            if seq.token_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=device)
        )
        if seq.has_documents:
            doc = (seq.seq_idx + seq.first_doc[:, None]).flatten()
            first, last = seq.first_doc, seq.last_doc
            n_seqs = int(last[-1]) + 1
        else:
            doc = torch.arange(batch, device=device).repeat_interleave(length)
            first = last = torch.arange(batch, device=device)
            n_seqs = batch
        flat_valid = valid.flatten()
        counts = torch.zeros(n_seqs, dtype=torch.long, device=device).index_add_(0, doc, flat_valid.long())
        # rank of each token among its document's real tokens (documents are contiguous in B*T order)
        rank = flat_valid.long().cumsum(0) - 1 - (counts.cumsum(0) - counts)[doc]
        phase = torch.zeros(n_seqs, dtype=torch.long, device=device)
        if absorbed is not None:
            phase[first] = absorbed % chunk_size
        token_index = torch.nonzero(flat_valid).flatten()
        doc, rank = doc[token_index], rank[token_index]
        offset = phase[doc] + rank
        chunk = offset // chunk_size
        slot = (
            offset % chunk_size
            if aligned
            else offset - chunk * chunk_size - torch.where(chunk == 0, phase[doc], 0)
        )
        n_chunks = int(chunk.max()) + 1 if len(chunk) else 1
        width = chunk_size if aligned else (int(slot.max()) + 1 if len(slot) else 1)
        grid_index = (doc * n_chunks + chunk) * width + slot
        return cls(token_index, grid_index, (n_seqs, n_chunks, width), chunk_size, first, last, phase, counts)

    def to_grid(self, x: Tensor) -> Tensor:
        """[B, T, ...] -> [N, C, W, ...], zeros in empty slots."""
        out = x.new_zeros(math.prod(self.shape), *x.shape[2:])
        out = out.index_copy(0, self.grid_index, x.flatten(0, 1)[self.token_index])
        return out.view(*self.shape, *x.shape[2:])

    def to_tokens(self, y: Tensor, batch: int, length: int) -> Tensor:
        """[N, C, W, ...] -> [B, T, ...], zeros at padding."""
        out = y.new_zeros(batch * length, *y.shape[3:])
        out = out.index_copy(0, self.token_index, y.flatten(0, 2)[self.grid_index])
        return out.view(batch, length, *y.shape[3:])

    def live(self) -> Tensor:
        """[N, C, W] bool: the slot holds a token of this call."""
        flat = torch.zeros(math.prod(self.shape), dtype=torch.bool, device=self.phase.device)
        flat[self.grid_index] = True
        return flat.view(self.shape)

    def completes(self) -> Tensor:
        """[N, C] bool: the sequence fills chunk c to its end in this call (the next chunk starts afresh)."""
        ends = (torch.arange(self.shape[1], device=self.phase.device) + 1) * self.chunk_size
        return (self.phase + self.counts)[:, None] >= ends

    def last_chunk(self) -> Tensor:
        """[N] the chunk holding each sequence's last slot in use (0 for a sequence with no tokens)."""
        return ((self.phase + self.counts - 1).clamp(min=0) // self.chunk_size).clamp(max=self.shape[1] - 1)

    def initial(self, row_values: Tensor | None, fresh: Tensor) -> Tensor:
        """Per-sequence starting values [N, ...]: a row's cached value for its first sequence, else fresh."""
        out = fresh.expand(self.shape[0], *fresh.shape[1:]).clone()
        if row_values is not None:
            out[self.first_seq] = row_values.to(out.dtype)
        return out

    def final(self, seq_values: Tensor) -> Tensor:
        """Per-sequence values [N, ...] -> the value each row ends with [B, ...]."""
        return seq_values[self.last_seq]

    def absorbed_after(self, absorbed: Tensor | None) -> Tensor:
        """[B] tokens of each row's current document after this call."""
        carried = torch.zeros_like(self.counts[self.last_seq])
        if absorbed is not None:
            carried = torch.where(self.first_seq == self.last_seq, absorbed, carried)
        return carried + self.counts[self.last_seq]


# ------------------------------------------------------------------------------- sliding-window attention


def unpack(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Flat weights [..., P] -> matrices [..., out, in] (states keep a head's weights in one tensor)."""
    parts = flat.split([rows * cols for rows, cols in shapes], dim=-1)
    return [part.unflatten(-1, shape) for part, shape in zip(parts, shapes)]


def pack(mats: list[Tensor]) -> Tensor:
    return torch.cat([m.flatten(-2) for m in mats], dim=-1)
