"""Triton kernels for the chunked delta rule; equations and names follow reference.py.

Inputs are flattened to one row of tokens ([B * T, ...]); every sequence (a batch row, or a cu_seqlens piece) is cut
into chunks of BT tokens that never straddle two sequences (the SSD kernels' `_Chunks`). Inside a chunk G is the
cumulative log-decay from the chunk start ([BT] for a scalar decay, [BT, K] per channel, from tl.cumsum in every
kernel), Gamma = exp(G), and the whole key dimension sits in one block (K <= 256).

Forward
    _wy_fwd       grid (chunks, heads): A (strictly lower, b_l k_l^T diag(Gamma_l / Gamma_s) k_s), T = (I + A)^-1 by
                  forward substitution, W = T (b Gamma k) and U = T (b v), stored per token.
    _states_fwd   grid (V blocks, sequences x heads), a loop over the sequence's chunks: stores h[c] (the state the
                  chunk starts from), delta = U - W h[c], then h <- Gamma_L h + (Gamma_L / Gamma k)^T delta; the final
                  state.
    _output_fwd   grid (V blocks, chunks, heads): o = scale ((Gamma q) h[c] + P delta), P the causal
                  q_l^T diag(Gamma_l / Gamma_s) k_s.
Backward (W, U, h and delta recomputed, not saved)
    _dv_local_bwd     grid (V blocks, chunks, heads): dDelta = scale P^T do (the part inside the chunk).
    _state_grads_bwd  the states loop walked backwards: dh[c] = gradient of the state after chunk c;
                      dDelta += (Gamma_L / Gamma k) dh[c]; dh <- scale (Gamma q)^T do + Gamma_L dh - W^T dDelta.
    _chunk_bwd        grid (chunks, heads), a loop over V blocks: dq, dk, dv, db and dg of the chunk: through
                      delta = U - W h (dW = -dDelta h^T), the UT transform (dA = -T^T dT T^T), the [BT, BT] factors
                      and every Gamma; dg is the reverse cumulative sum of dG in the chunk.
A per-channel decay has no [BT, BT] factorisation that cannot overflow (1 / Gamma_s reaches exp(80) within a few
tokens of a fast channel), so its [BT, BT] factors and their gradients are built one column s at a time from
exact exp(G_l - G_s) <= 1 tiles: BT^2 K multiply-adds outside tensor cores, where a scalar decay uses tl.dot.
Accumulation and every tl.dot are fp32 ("ieee" for fp32 inputs, tf32 otherwise; fp32 always under the interpreter);
W, U, delta, h and their gradients are stored in fp32. Autotuning (the V block of the state loops) runs on the first
call per shape; LCTK_TRITON_AUTOTUNE=0 takes the first config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ssd.triton import INTERPRET, _chunk_position, _Chunks, _configs

_STATE_CONFIGS = _configs([{"BV": 32}, {"BV": 16}, {"BV": 64}], [4], [2, 3])
_KEY = ["H", "K", "V", "BT", "USE_G", "CHANNEL"]
_CHUNK_BV = 32  # V block of the per-chunk kernels
# the per-chunk kernels hold several [BT, K] and [BT, BT] fp32 tiles with K up to 256: no software pipelining, whose
# buffered copies of the dot operands would multiply their shared memory
_CHUNK_LAUNCH = {"num_warps": 4, "num_stages": 1}


@triton.jit
def _tile(ptr, rows, row_mask, i_h, H: tl.constexpr, D: tl.constexpr, offs, mask):
    """x[rows, i_h, offs] of a [tokens, H, D] tensor as [BT, len(offs)] fp32, 0 outside."""
    return tl.load(ptr + (rows[:, None] * H + i_h) * D + offs[None, :], mask=row_mask[:, None] & mask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, x, rows, row_mask, i_h, H: tl.constexpr, D: tl.constexpr, offs, mask):
    tl.store(ptr + (rows[:, None] * H + i_h) * D + offs[None, :], x.to(ptr.dtype.element_ty),
             mask=row_mask[:, None] & mask[None, :])


@triton.jit
def _row(x, idx, i):
    """Row i of a register tile x [BT, D] (idx = tl.arange(0, BT))."""
    return tl.sum(tl.where(idx[:, None] == i, x, 0.0), axis=0)


@triton.jit
def _col(x, idx, j):
    """Column j of a register tile x [R, BT] (idx = tl.arange(0, BT))."""
    return tl.sum(tl.where(idx[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _log_decay(g, rows, row_mask, i_h, H: tl.constexpr, K: tl.constexpr, offs_k, mask_k, BT: tl.constexpr,
               USE_G: tl.constexpr, CHANNEL: tl.constexpr):
    """G: the cumulative log-decay inside the chunk, [BT, BK] per channel or [BT] per head (zeros without g)."""
    if CHANNEL:
        G = tl.cumsum(_tile(g, rows, row_mask, i_h, H, K, offs_k, mask_k), axis=0)
    elif USE_G:
        G = tl.cumsum(tl.load(g + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32), axis=0)
    else:
        G = tl.zeros([BT], dtype=tl.float32)
    return G


@triton.jit
def _decay_tiles(G, idx, BT: tl.constexpr, CHANNEL: tl.constexpr):
    """(Gamma and Gamma_L / Gamma as multipliers of [BT, BK] tiles, Gamma_L as a multiplier of a state's rows, and
    G_L: a [BK] vector per channel, a scalar per head)."""
    if CHANNEL:
        G_L = _row(G, idx, BT - 1)
        gamma = tl.exp(G)
        end_decay = tl.exp(G_L[None, :] - G)
        gamma_L = tl.exp(G_L)[:, None]
    else:
        G_L = tl.sum(tl.where(idx == BT - 1, G, 0.0), axis=0)
        gamma = tl.exp(G)[:, None]
        end_decay = tl.exp(G_L - G)[:, None]
        gamma_L = tl.exp(G_L)
    return gamma, end_decay, gamma_L, G_L


@triton.jit
def _channel_pairs(x, k, G, idx, STRICT: tl.constexpr, BT: tl.constexpr):
    """out[l, s] = sum_d x_l[d] k_s[d] exp(G_l[d] - G_s[d]) for s <= l (s < l when STRICT), 0 elsewhere; x, k, G
    [BT, BK]. One column at a time, every exp() <= 1."""
    out = tl.zeros([BT, BT], dtype=tl.float32)
    for s in range(BT):
        k_s, G_s = _row(k, idx, s), _row(G, idx, s)
        keep = idx > s if STRICT else idx >= s
        decay = tl.exp(tl.where(keep[:, None], G - G_s[None, :], float("-inf")))
        out = tl.where(idx[None, :] == s, tl.sum(x * k_s[None, :] * decay, axis=1)[:, None], out)
    return out


@triton.jit
def _scalar_decay(G, idx, STRICT: tl.constexpr):
    """exp(G_l - G_s) for s <= l (s < l when STRICT), 0 elsewhere: [BT, BT]."""
    keep = idx[:, None] > idx[None, :] if STRICT else idx[:, None] >= idx[None, :]
    return tl.exp(tl.where(keep, G[:, None] - G[None, :], float("-inf")))


@triton.jit
def _inverse_unit_lower(A, idx, BT: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular A [BT, BT], row by row (forward substitution)."""
    inverse = tl.where(idx[:, None] == idx[None, :], 1.0, 0.0)
    for i in range(1, BT):
        update = tl.sum(_row(A, idx, i)[:, None] * inverse, axis=0)  # sum_{j < i} A_ij T_j
        inverse = tl.where(idx[:, None] == i, inverse - update[None, :], inverse)
    return inverse


@triton.jit
def _ut_transform(k_c, b_c, G, idx, BT: tl.constexpr, CHANNEL: tl.constexpr, PRECISION: tl.constexpr):
    """(KK, T = (I + diag(b) KK)^-1) of a chunk."""
    if CHANNEL:
        kk = _channel_pairs(k_c, k_c, G, idx, True, BT)
    else:
        kk = tl.dot(k_c, tl.trans(k_c), input_precision=PRECISION) * _scalar_decay(G, idx, True)
    return kk, _inverse_unit_lower(b_c[:, None] * kk, idx, BT)


@triton.jit
def _wy_fwd(
    k, v, g, beta, w, u, cu_seqlens, chunk_offsets, chunk_index,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, mask_t, _ = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    idx, offs_k = tl.arange(0, BT), tl.arange(0, BK)
    mask_k = offs_k < K
    k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
    b_c = tl.load(beta + rows * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
    G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
    gamma, _, _, _ = _decay_tiles(G, idx, BT, CHANNEL)
    _, inverse = _ut_transform(k_c, b_c, G, idx, BT, CHANNEL, PRECISION)
    w_c = tl.dot(inverse, b_c[:, None] * gamma * k_c, input_precision=PRECISION)
    _store(w, w_c, rows, mask_t, i_h, H, K, offs_k, mask_k)
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        v_c = _tile(v, rows, mask_t, i_h, H, V, offs_v, mask_v)
        u_c = tl.dot(inverse, b_c[:, None] * v_c, input_precision=PRECISION)
        _store(u, u_c, rows, mask_t, i_h, H, V, offs_v, mask_v)


@triton.autotune(configs=_STATE_CONFIGS, key=_KEY)
@triton.jit
def _states_fwd(
    k, g, w, u, h0, h, delta, ht, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    idx, offs_k, offs_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    tile = offs_k[:, None] * V + offs_v[None, :]
    tile_mask = mask_k[:, None] & mask_v[None, :]
    seq_state = tl.cast(i_nh, tl.int64) * K * V  # this sequence and head in [N, H, K, V]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state += tl.load(h0 + seq_state + tile, mask=tile_mask, other=0.0).to(tl.float32)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        rows = tl.cast(bos + i_t * BT, tl.int64) + idx
        mask_t = rows < eos
        chunk = tl.cast(first_chunk + i_t, tl.int64)
        tl.store(h + (chunk * H + i_h) * K * V + tile, state, mask=tile_mask)
        w_c = _tile(w, rows, mask_t, i_h, H, K, offs_k, mask_k)
        delta_c = _tile(u, rows, mask_t, i_h, H, V, offs_v, mask_v) - tl.dot(w_c, state, input_precision=PRECISION)
        _store(delta, delta_c, rows, mask_t, i_h, H, V, offs_v, mask_v)
        k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
        G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
        _, end_decay, gamma_L, _ = _decay_tiles(G, idx, BT, CHANNEL)
        state = gamma_L * state + tl.dot(tl.trans(end_decay * k_c), delta_c, input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(ht + seq_state + tile, state, mask=tile_mask)


@triton.jit
def _output_fwd(
    q, k, g, h, delta, o, cu_seqlens, chunk_offsets, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, mask_t, chunk = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    idx, offs_k, offs_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    q_c = _tile(q, rows, mask_t, i_h, H, K, offs_k, mask_k)
    k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
    G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
    gamma, _, _, _ = _decay_tiles(G, idx, BT, CHANNEL)
    if CHANNEL:
        p = _channel_pairs(q_c, k_c, G, idx, False, BT)
    else:
        p = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * _scalar_decay(G, idx, False)
    h_c = tl.load(h + (chunk * H + i_h) * K * V + offs_k[:, None] * V + offs_v[None, :],
                  mask=mask_k[:, None] & mask_v[None, :], other=0.0)
    delta_c = _tile(delta, rows, mask_t, i_h, H, V, offs_v, mask_v)
    o_c = tl.dot(gamma * q_c, h_c, input_precision=PRECISION) + tl.dot(p, delta_c, input_precision=PRECISION)
    _store(o, scale * o_c, rows, mask_t, i_h, H, V, offs_v, mask_v)


@triton.jit
def _dv_local_bwd(
    q, k, g, do, d_delta, cu_seqlens, chunk_offsets, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, mask_t, _ = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    idx, offs_k, offs_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    q_c = _tile(q, rows, mask_t, i_h, H, K, offs_k, mask_k)
    k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
    G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
    if CHANNEL:
        p = _channel_pairs(q_c, k_c, G, idx, False, BT)
    else:
        p = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * _scalar_decay(G, idx, False)
    do_c = _tile(do, rows, mask_t, i_h, H, V, offs_v, mask_v)
    _store(d_delta, scale * tl.dot(tl.trans(p), do_c, input_precision=PRECISION), rows, mask_t, i_h, H, V, offs_v,
           mask_v)


@triton.autotune(configs=_STATE_CONFIGS, key=_KEY)
@triton.jit
def _state_grads_bwd(
    q, k, g, w, do, d_delta, dht, dh, dh0, cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    n_chunks = tl.cdiv(eos - bos, BT)
    idx, offs_k, offs_v = tl.arange(0, BT), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    tile = offs_k[:, None] * V + offs_v[None, :]
    tile_mask = mask_k[:, None] & mask_v[None, :]
    seq_state = tl.cast(i_nh, tl.int64) * K * V

    d_state = tl.zeros([BK, BV], dtype=tl.float32)  # gradient of the state after the current chunk
    if USE_DHT:
        d_state += tl.load(dht + seq_state + tile, mask=tile_mask, other=0.0).to(tl.float32)
    for i_back in range(n_chunks):
        i_t = n_chunks - 1 - i_back
        rows = tl.cast(bos + i_t * BT, tl.int64) + idx
        mask_t = rows < eos
        chunk = tl.cast(first_chunk + i_t, tl.int64)
        tl.store(dh + (chunk * H + i_h) * K * V + tile, d_state, mask=tile_mask)
        k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
        G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
        gamma, end_decay, gamma_L, _ = _decay_tiles(G, idx, BT, CHANNEL)
        to_end = end_decay * k_c
        dd_c = _tile(d_delta, rows, mask_t, i_h, H, V, offs_v, mask_v) + tl.dot(to_end, d_state,
                                                                                input_precision=PRECISION)
        _store(d_delta, dd_c, rows, mask_t, i_h, H, V, offs_v, mask_v)
        gq = gamma * _tile(q, rows, mask_t, i_h, H, K, offs_k, mask_k)
        do_c = _tile(do, rows, mask_t, i_h, H, V, offs_v, mask_v)
        w_c = _tile(w, rows, mask_t, i_h, H, K, offs_k, mask_k)
        d_state = (scale * tl.dot(tl.trans(gq), do_c, input_precision=PRECISION) + gamma_L * d_state
                   - tl.dot(tl.trans(w_c), dd_c, input_precision=PRECISION))
    if STORE_DH0:
        tl.store(dh0 + seq_state + tile, d_state, mask=tile_mask)


@triton.jit
def _chunk_bwd(
    q, k, v, g, beta, h, dh, delta, d_delta, do, dq, dk, dv, dbeta, dg, cu_seqlens, chunk_offsets, chunk_index, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, CHANNEL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    rows, mask_t, chunk = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    idx, offs_k = tl.arange(0, BT), tl.arange(0, BK)
    mask_k = offs_k < K
    q_c = _tile(q, rows, mask_t, i_h, H, K, offs_k, mask_k)
    k_c = _tile(k, rows, mask_t, i_h, H, K, offs_k, mask_k)
    b_c = tl.load(beta + rows * H + i_h, mask=mask_t, other=0.0).to(tl.float32)
    G = _log_decay(g, rows, mask_t, i_h, H, K, offs_k, mask_k, BT, USE_G, CHANNEL)
    gamma, end_decay, gamma_L, G_L = _decay_tiles(G, idx, BT, CHANNEL)
    to_end = end_decay * k_c
    kk, inverse = _ut_transform(k_c, b_c, G, idx, BT, CHANNEL, PRECISION)
    state_at = (chunk * H + i_h) * K * V

    dq_state = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
    d_p = tl.zeros([BT, BT], dtype=tl.float32)  # do delta^T
    d_to_end = tl.zeros([BT, BK], dtype=tl.float32)  # delta dh^T
    d_w = tl.zeros([BT, BK], dtype=tl.float32)  # -dDelta h^T
    d_inverse = tl.zeros([BT, BT], dtype=tl.float32)
    d_b = tl.zeros([BT], dtype=tl.float32)
    h_dh = tl.zeros([BK], dtype=tl.float32)  # sum_v h * dh, per key channel
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        tile_mask = mask_k[:, None] & mask_v[None, :]
        tile = state_at + offs_k[:, None] * V + offs_v[None, :]
        h_c = tl.load(h + tile, mask=tile_mask, other=0.0)
        dh_c = tl.load(dh + tile, mask=tile_mask, other=0.0)
        do_c = _tile(do, rows, mask_t, i_h, H, V, offs_v, mask_v)
        v_c = _tile(v, rows, mask_t, i_h, H, V, offs_v, mask_v)
        delta_c = _tile(delta, rows, mask_t, i_h, H, V, offs_v, mask_v)
        dd_c = _tile(d_delta, rows, mask_t, i_h, H, V, offs_v, mask_v)
        dq_state += tl.dot(do_c, tl.trans(h_c), input_precision=PRECISION)
        d_p += tl.dot(do_c, tl.trans(delta_c), input_precision=PRECISION)
        d_to_end += tl.dot(delta_c, tl.trans(dh_c), input_precision=PRECISION)
        d_w -= tl.dot(dd_c, tl.trans(h_c), input_precision=PRECISION)
        d_inverse += tl.dot(dd_c, tl.trans(b_c[:, None] * v_c), input_precision=PRECISION)  # dU (b v)^T
        d_bv = tl.dot(tl.trans(inverse), dd_c, input_precision=PRECISION)  # gradient of b v
        _store(dv, b_c[:, None] * d_bv, rows, mask_t, i_h, H, V, offs_v, mask_v)
        d_b += tl.sum(d_bv * v_c, axis=1)
        h_dh += tl.sum(h_c * dh_c, axis=1)

    causal = idx[:, None] >= idx[None, :]
    d_p = scale * tl.where(causal, d_p, 0.0)
    x_w = b_c[:, None] * gamma * k_c  # W = T x_w
    d_xw = tl.dot(tl.trans(inverse), d_w, input_precision=PRECISION)
    d_inverse += tl.dot(d_w, tl.trans(x_w), input_precision=PRECISION)
    d_a = -tl.dot(tl.dot(tl.trans(inverse), d_inverse, input_precision=PRECISION), tl.trans(inverse),
                  input_precision=PRECISION)
    d_a = tl.where(idx[:, None] > idx[None, :], d_a, 0.0)
    d_ab = d_a * b_c[:, None]  # A = b KK: the gradient of KK
    d_b += tl.sum(d_a * kk, axis=1)

    dq_c = scale * gamma * dq_state
    dk_c = end_decay * d_to_end + b_c[:, None] * gamma * d_xw
    d_b += tl.sum(d_xw * gamma * k_c, axis=1)
    dG = q_c * dq_c + d_xw * x_w - to_end * d_to_end  # [BT, BK] shares of every Gamma
    dG_last = tl.sum(to_end * d_to_end, axis=0)  # [BK] shares of Gamma_L
    if CHANNEL:
        dG_last += tl.exp(G_L) * h_dh
        for s in range(BT):
            k_s, G_s = _row(k_c, idx, s), _row(G, idx, s)
            decay = tl.exp(tl.where((idx >= s)[:, None], G - G_s[None, :], float("-inf")))  # [BT, BK]
            weight_q = _col(d_p, idx, s)[:, None] * decay  # dP[l, s] exp(G_l - G_s)
            weight_k = _col(d_ab, idx, s)[:, None] * decay  # dKK[l, s] exp(G_l - G_s), 0 for l <= s
            dq_c += weight_q * k_s[None, :]
            dk_c += weight_k * k_s[None, :]
            share = (weight_q * q_c + weight_k * k_c) * k_s[None, :]
            dk_s = tl.sum(weight_q * q_c + weight_k * k_c, axis=0)
            dk_c = tl.where(idx[:, None] == s, dk_c + dk_s[None, :], dk_c)
            dG += share
            dG = tl.where(idx[:, None] == s, dG - tl.sum(share, axis=0)[None, :], dG)
        dG = tl.where(idx[:, None] == BT - 1, dG + dG_last[None, :], dG)
    else:
        p_decay = _scalar_decay(G, idx, False)
        kk_decay = _scalar_decay(G, idx, True)
        d_pe, d_kke = d_p * p_decay, d_ab * kk_decay
        dq_c += tl.dot(d_pe, k_c, input_precision=PRECISION)
        dk_c += tl.dot(tl.trans(d_pe), q_c, input_precision=PRECISION)
        dk_c += tl.dot(d_kke, k_c, input_precision=PRECISION) + tl.dot(tl.trans(d_kke), k_c, input_precision=PRECISION)
        p = tl.dot(q_c, tl.trans(k_c), input_precision=PRECISION) * p_decay
        pairs = d_p * p + d_ab * kk
        dG_scalar = tl.sum(dG, axis=1) + tl.sum(pairs, axis=1) - tl.sum(pairs, axis=0)
        dG_last_scalar = tl.sum(dG_last, axis=0) + gamma_L * tl.sum(h_dh, axis=0)
        dG_scalar = tl.where(idx == BT - 1, dG_scalar + dG_last_scalar, dG_scalar)

    _store(dq, dq_c, rows, mask_t, i_h, H, K, offs_k, mask_k)
    _store(dk, dk_c, rows, mask_t, i_h, H, K, offs_k, mask_k)
    tl.store(dbeta + rows * H + i_h, d_b, mask=mask_t)
    if CHANNEL:
        _store(dg, tl.cumsum(dG, axis=0, reverse=True), rows, mask_t, i_h, H, K, offs_k, mask_k)
    elif USE_G:
        tl.store(dg + rows * H + i_h, tl.cumsum(dG_scalar, axis=0, reverse=True), mask=mask_t)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


def _block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


class _Prepared:
    """Flattened inputs and the constants every kernel takes."""

    def __init__(self, q, k, v, g, beta, cu_seqlens, chunk_size):
        batch, seq_len, heads, key_dim = q.shape
        self.chunks = _Chunks(batch, seq_len, cu_seqlens, chunk_size, q.device)
        self.q, self.k, self.v = (x.flatten(0, 1).contiguous() for x in (q, k, v))
        self.g = None if g is None else g.flatten(0, 1).float().contiguous()
        self.beta = beta.flatten(0, 1).float().contiguous()
        self.args = dict(H=heads, K=key_dim, V=v.shape[-1], BT=chunk_size, BK=_block(key_dim), USE_G=g is not None,
                         CHANNEL=g is not None and g.dim() == 4, PRECISION=_precision(q.dtype))

    def chunk_grid(self, with_v: bool) -> tuple[int, ...]:
        grid = (self.chunks.n_chunks, self.args["H"])
        return (triton.cdiv(self.args["V"], _CHUNK_BV), *grid) if with_v else grid

    def state_grid(self):
        return lambda meta: (triton.cdiv(self.args["V"], meta["BV"]), self.chunks.n_seqs * self.args["H"])

    def forward_states(self, h0: Tensor | None, store_final: bool):
        """W, U (per token), h (per chunk), delta (per token) and the final states (or None), all fp32."""
        c, a = self.chunks, self.args
        w = self.k.new_empty(self.k.shape, dtype=torch.float32)
        u = self.v.new_empty(self.v.shape, dtype=torch.float32)
        _wy_fwd[self.chunk_grid(False)](self.k, self.v, self.g, self.beta, w, u, c.cu_seqlens, c.chunk_offsets,
                                        c.chunk_index, BV=_CHUNK_BV, **a, **_CHUNK_LAUNCH)
        h = self.k.new_empty(c.n_chunks, a["H"], a["K"], a["V"], dtype=torch.float32)
        delta = torch.empty_like(u)
        final = self.k.new_empty(c.n_seqs, a["H"], a["K"], a["V"], dtype=torch.float32) if store_final else None
        _states_fwd[self.state_grid()](self.k, self.g, w, u, h0, h, delta, final, c.cu_seqlens, c.chunk_offsets,
                                       USE_H0=h0 is not None, STORE_FINAL=store_final, **a)
        return w, h, delta, final


class _TritonDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, cu_seqlens, chunk_size):
        run = _Prepared(q, k, v, g, beta, cu_seqlens, chunk_size)
        h0 = None if initial_state is None else initial_state.float().contiguous()
        _, h, delta, final = run.forward_states(h0, store_final=True)
        o = torch.empty_like(run.v)
        c = run.chunks
        _output_fwd[run.chunk_grid(True)](run.q, run.k, run.g, h, delta, o, c.cu_seqlens, c.chunk_offsets,
                                          c.chunk_index, scale, BV=_CHUNK_BV, **run.args, **_CHUNK_LAUNCH)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, g, beta, h0)
        ctx.scale, ctx.cu_seqlens, ctx.chunk_size = scale, cu_seqlens, chunk_size
        return o.view(v.shape), final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, beta, h0 = ctx.saved_tensors
        run = _Prepared(q, k, v, g, beta, ctx.cu_seqlens, ctx.chunk_size)
        c, a, scale = run.chunks, run.args, ctx.scale
        d_o = torch.zeros_like(run.v) if d_o is None else d_o.flatten(0, 1).contiguous()
        d_final = None if d_final is None else d_final.float().contiguous()
        w, h, delta, _ = run.forward_states(h0, store_final=False)

        d_delta = torch.empty_like(delta)
        _dv_local_bwd[run.chunk_grid(True)](run.q, run.k, run.g, d_o, d_delta, c.cu_seqlens, c.chunk_offsets,
                                            c.chunk_index, scale, BV=_CHUNK_BV, **a, **_CHUNK_LAUNCH)
        dh = torch.empty_like(h)
        want_dh0 = h0 is not None and ctx.needs_input_grad[5]
        dh0 = torch.empty_like(h0) if want_dh0 else None
        _state_grads_bwd[run.state_grid()](run.q, run.k, run.g, w, d_o, d_delta, d_final, dh, dh0, c.cu_seqlens,
                                           c.chunk_offsets, scale, USE_DHT=d_final is not None, STORE_DH0=want_dh0,
                                           **a)
        dq, dk = torch.empty_like(run.q), torch.empty_like(run.k)
        dv = torch.empty_like(run.v)
        dbeta = torch.empty_like(run.beta)
        dg = None if g is None else torch.empty_like(run.g)
        _chunk_bwd[run.chunk_grid(False)](run.q, run.k, run.v, run.g, run.beta, h, dh, delta, d_delta, d_o, dq, dk, dv,
                                          dbeta, dg, c.cu_seqlens, c.chunk_offsets, c.chunk_index, scale,
                                          BV=_CHUNK_BV, **a, **_CHUNK_LAUNCH)
        dg = None if dg is None else dg.view(g.shape).to(g.dtype)
        return (dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dg, dbeta.view(beta.shape).to(beta.dtype), dh0,
                None, None, None)


def delta_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of `lctk.kernels.delta.delta_rule` (inputs already checked). The chunk length is chunk_size
    rounded to a power of two in [16, 64]; the result does not depend on it."""
    block_t = min(64, max(16, triton.next_power_of_2(chunk_size)))
    o, final = _TritonDelta.apply(q, k, v, g, beta, initial_state, float(scale), cu_seqlens, block_t)
    return o, final if output_final_state else None
