"""Chunked linear recurrence with a scalar per-head decay (state space duality), in plain torch.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          state   [K, V] per head
    o_t = scale * q_t^T S_t                       output  [V]    (the current token is included)

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V]; g [B, T, H] (log-decay, <= 0; None means no decay);
states [B, H, K, V]. Value head h reads q/k head h // (H // Hk) (Mamba-2's n_groups, GQA for linear attention).
Einsum letters: b batch, c chunk, l/s positions inside a chunk (query/key), h = (j r) head = (group, head in group),
k key dim, v value dim.

This is the ground truth for the Triton kernels and the CPU path. Sequence boundaries (cu_seqlens, batch must be 1)
are handled by laying every sequence out in whole chunks, so no chunk straddles two sequences: the intra-chunk
part needs no masking and the chunk-to-chunk state passing restarts at each sequence's first chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ssd_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """Reference chunked SSD. Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None)."""
    batch, seq_len, n_groups, _ = q.shape
    n_heads = v.shape[2]
    if g is None:
        g = q.new_zeros(batch, seq_len, n_heads, dtype=torch.float32)
    if cu_seqlens is None:
        bounds = [(0, seq_len)]
    else:
        offsets = cu_seqlens.tolist()
        bounds = list(zip(offsets[:-1], offsets[1:]))

    # Lay every sequence out in whole chunks, one after another: [B, C, L, ...]. The padding is k = 0, g = 0, which
    # leaves the state as it is. first_chunk[n] is where sequence n starts.
    def chunked(x: Tensor) -> Tensor:
        return torch.cat([_pad_and_split(x[:, s:e].float(), chunk_size) for s, e in bounds], dim=1)

    chunks_per_seq = [-(-(e - s) // chunk_size) for s, e in bounds]
    first_chunk = [sum(chunks_per_seq[:n]) for n in range(len(bounds))]
    qc, kc, vc, gc = chunked(q), chunked(k), chunked(v), chunked(g)
    n_chunks = qc.shape[1]
    # v heads grouped by the q/k head they read: h = (j r)
    vc = vc.unflatten(3, (n_groups, n_heads // n_groups))  # [b, c, l, j, r, v]
    gc = gc.unflatten(3, (n_groups, n_heads // n_groups))  # [b, c, l, j, r]

    g_cum = gc.cumsum(dim=2)  # log-decay from the chunk start to l, inclusive
    g_total = g_cum[:, :, -1]  # [b, c, j, r] log-decay across the whole chunk

    # 1. inside each chunk: o_l += sum_{s <= l} (q_l . k_s) exp(G_l - G_s) v_s
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    log_decay = g_cum.unsqueeze(3) - g_cum.unsqueeze(2)  # [b, c, l, s, j, r]
    decay = torch.exp(log_decay.masked_fill(~causal[:, :, None, None], float("-inf")))
    scores = torch.einsum("bcljk,bcsjk->bclsj", qc, kc)
    o = torch.einsum("bclsj,bclsjr,bcsjrv->bcljrv", scores, decay, vc)

    # 2. what each chunk alone adds to the state at its end: sum_s exp(G_last - G_s) k_s v_s^T
    to_end = torch.exp(g_total.unsqueeze(2) - g_cum)  # [b, c, s, j, r]
    chunk_states = torch.einsum("bcsjk,bcsjr,bcsjrv->bcjrkv", kc, to_end, vc)

    # 3. pass the state from chunk to chunk: S_in[c] = exp(G_total[c-1]) S_in[c-1] + chunk_states[c-1],
    #    restarting from the sequence's initial state at its first chunk
    if initial_state is None:
        initial = qc.new_zeros(len(bounds) * batch, n_groups, n_heads // n_groups, qc.shape[-1], vc.shape[-1])
    else:
        initial = initial_state.float().unflatten(1, (n_groups, n_heads // n_groups))
    states_in, final_states = [], []
    for n, (start, count) in enumerate(zip(first_chunk, chunks_per_seq)):
        state = initial[n : n + 1] if cu_seqlens is not None else initial
        for c in range(start, start + count):
            states_in.append(state)
            state = torch.exp(g_total[:, c])[..., None, None] * state + chunk_states[:, c]
        final_states.append(state)
    states_in = torch.stack(states_in, dim=1)  # [b, c, j, r, k, v]

    # 4. the carried-in state seen from each position: o_l += exp(G_l) q_l^T S_in
    o = o + torch.einsum("bcljk,bcljr,bcjrkv->bcljrv", qc, torch.exp(g_cum), states_in)
    o = (scale * o).flatten(3, 4)  # [b, c, l, h, v]
    o = torch.cat([o[:, s : s + n].flatten(1, 2)[:, : e - b] for s, n, (b, e) in zip(first_chunk, chunks_per_seq, bounds)], 1)
    final_state = torch.cat(final_states).flatten(1, 2) if output_final_state else None
    return o.to(v.dtype), final_state


def _pad_and_split(x: Tensor, chunk_size: int) -> Tensor:
    """[B, T, ...] -> [B, ceil(T / L), L, ...], zero-padded at the end."""
    pad = -x.shape[1] % chunk_size
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
    return x.unflatten(1, (x.shape[1] // chunk_size, chunk_size))


def ssd_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor, *, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One decoding step. q, k [B, Hk, K]; v [B, H, V]; g [B, H] or None; state [B, H, K, V] (fp32).
    Returns (o [B, H, V] in v's dtype, new state)."""
    repeat = v.shape[1] // q.shape[1]
    q, k = q.float().repeat_interleave(repeat, dim=1), k.float().repeat_interleave(repeat, dim=1)
    state = state.float()
    if g is not None:
        state = torch.exp(g.float())[..., None, None] * state
    state = state + k.unsqueeze(-1) * v.float().unsqueeze(-2)
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(v.dtype), state
