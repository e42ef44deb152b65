"""What every mixer needs to know about the tokens of one forward call besides their hidden states: positions,
document boundaries of packed rows, and padding.

Documents: position_ids that restart at 0 inside a row start a new document (the convention of transformers'
DataCollatorWithFlattening), or `cu_seqlens` over a batch of one row. A forward call that continues a cache
continues the cached document with its first tokens: a cache holds one document per row.
Padding: a 2D attention_mask (1 = token, 0 = pad) covering the cached tokens and the new ones, as generate() passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lctk.kernels.ssd import ssd


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

    @property
    def has_documents(self) -> bool:
        return self.seq_idx is not None

    def flat_initial_states(self, row_states: Tensor | None) -> Tensor | None:
        """Per-row states [B, ...] -> per-document states [N, ...]: each row's first document continues the row's
        state, the others start from zero."""
        if row_states is None:
            return None
        states = row_states.new_zeros(len(self.cu_seqlens) - 1, *row_states.shape[1:])
        states[self.first_doc] = row_states
        return states

    def row_final_states(self, doc_states: Tensor) -> Tensor:
        """Per-document final states [N, ...] -> the state each row ends with [B, ...]."""
        return doc_states[self.last_doc]


def build_sequence_info(
    batch: int,
    length: int,
    past_length: int,
    device: torch.device,
    position_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> SequenceInfo:
    key_mask = token_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
            raise ValueError(f"attention_mask: expected [batch, past + length], got {tuple(attention_mask.shape)}")
        key_mask = attention_mask[:, -(past_length + length) :].bool()
        if bool(key_mask.all()):
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
    elif position_ids is not None and length > 1:
        restarts = position_ids[:, 1:] == 0
        if bool(restarts.any()):
            seq_idx = torch.cat([torch.zeros_like(position_ids[:, :1]), restarts.long().cumsum(1)], dim=1)

    if position_ids is None:
        if attention_mask is not None:
            full = attention_mask.long().cumsum(-1) - 1
            position_ids = full.clamp(min=0)[:, -length:]
        else:
            position_ids = torch.arange(past_length, past_length + length, device=device).expand(batch, -1)

    info = SequenceInfo(position_ids=position_ids, seq_idx=seq_idx, token_mask=token_mask, key_mask=key_mask)
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
) -> tuple[Tensor, Tensor | None]:
    """`ssd` over the rows of one forward call; packed documents run as one flat row restarting at each
    boundary.
    initial: the per-row state to continue, or None (then no final state is returned)."""
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
