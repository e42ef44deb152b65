"""What the fast-weight mixers (Titans, LaCT) share: `ChunkGrid`, the real tokens of a call laid out in whole
chunks per document, and `pack` / `unpack`, a head's weight matrices kept as one flat tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lctk.models.sequence import SequenceInfo


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


def unpack(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """Flat weights [..., P] -> matrices [..., out, in] (states keep a head's weights in one tensor)."""
    parts = flat.split([rows * cols for rows, cols in shapes], dim=-1)
    return [part.unflatten(-1, shape) for part, shape in zip(parts, shapes)]


def pack(mats: list[Tensor]) -> Tensor:
    return torch.cat([m.flatten(-2) for m in mats], dim=-1)
