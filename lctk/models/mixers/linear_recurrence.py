"""The SSD linear recurrence S <- exp(g) S + k v^T, o = q^T S, as the mixers that use it (Mamba-2, BASED) run it:
`ssd_rows` over the rows of one forward call (packed documents, split rows) and `recurrent_step`, one decoding step
in place on a cached state."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from lctk.kernels.ssd import ssd
from lctk.models.sequence import SequenceInfo


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
