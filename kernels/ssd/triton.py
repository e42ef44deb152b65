"""Triton kernels for the chunked SSD op; the equations and names follow reference.py.

Inputs are flattened to one row of tokens ([B * T, ...]); every sequence (a batch row, or a cu_seqlens piece) is
cut into chunks of BT tokens that never straddle two sequences. Inside a chunk, G is the cumulative log-decay from
the chunk start (computed in every kernel with tl.cumsum, so there is no separate pass) and h[c] is the state chunk
c starts from, stored for all chunks.

Forward
    _states_fwd   grid (K blocks, V blocks, sequences x heads), a loop over the sequence's chunks:
                  stores h[c], then h <- exp(G_L) h + sum_s k_s (exp(G_L - G_s) v_s)^T; stores the final state.
    _output_fwd   grid (V blocks, chunks, heads), a loop over K blocks:
                  o = scale * (exp(G) * (q @ h[c]) + (causal(q @ k^T) * exp(G_l - G_s)) @ v).
Backward (h is recomputed, not saved)
    _state_grads_bwd  like _states_fwd walking backwards: dh[c] = gradient of the state after chunk c,
                      dh <- exp(G_L) dh + scale * (exp(G) q)^T do; stores the initial state's gradient.
    _dv_bwd       grid (V blocks, chunks, heads): dv = exp(G_L - G) * (k @ dh[c]) + scale * causal(...)^T @ do.
    _dqk_bwd      grid (K blocks, chunks, heads): dq, dk per value head, and that K block's share of dg:
                  with dG_u = q_u . dq_u - k_u . dk_u (the share of every exp(...) that G_u enters),
                  dg_t = sum_{u >= t in the chunk} dG_u + <h[c + 1], dh[c]>, where
                  <h[c + 1], dh[c]> = exp(G_L) <h[c], dh[c]> + sum_s k_s . (exp(G_L - G_s) v_s @ dh[c]^T).
Groups (H value heads reading Hk q/k heads): kernels run per value head; dq and dk are summed over a group after.

K and V above the block size are split: states over a K x V grid of programs, the [BT, BT] products by looping
over blocks. Accumulation is fp32. tl.dot takes bf16 operands for bf16 inputs on GPUs; otherwise fp32 operands,
full precision ("ieee") for fp32 inputs and tf32 for fp16 inputs (fp16 operands could overflow on large states);
always fp32 under the interpreter, where low-precision dots are unreliable. States h and dh are stored in bf16
for bf16 inputs (as the dots read them) and in fp32 otherwise. Autotuning (block sizes, warps, stages) runs on the
first call per shape; LCTK_TRITON_AUTOTUNE=0 takes the first config instead.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    INTERPRET = triton.knobs.runtime.interpret
except AttributeError:  # triton < 3.4 has no knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# LCTK_TRITON_AUTOTUNE=0 keeps one config per kernel: tests compile each shape once instead of once per config
AUTOTUNE = not INTERPRET and os.environ.get("LCTK_TRITON_AUTOTUNE", "1") != "0"


def _configs(blocks: list[dict], warps: list[int], stages: list[int]) -> list[triton.Config]:
    """Autotuning configs; the first alone when not autotuning."""
    if not AUTOTUNE:
        return [triton.Config(blocks[0], num_warps=warps[0], num_stages=1 if INTERPRET else stages[0])]
    return [triton.Config(b, num_warps=w, num_stages=s) for b in blocks for w in warps for s in stages]


_STATE_CONFIGS = _configs([{"BK": 64, "BV": 64}, {"BK": 32, "BV": 64}], [4], [2, 3])
_CHUNK_CONFIGS = _configs([{}], [4, 8], [2, 3])
_KEY = ["H", "HK", "K", "V", "BT", "USE_G"]


@triton.jit
def _tile(ptr, rows, cols, row_stride, row_mask, col_mask):
    """[rows, cols] tile of a row-major matrix: ptr[rows[:, None] * row_stride + cols[None, :]], 0 outside."""
    return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _tile_t(ptr, rows, cols, row_stride, row_mask, col_mask):
    """The same tile transposed: [cols, rows]."""
    return tl.load(ptr + rows[None, :] * row_stride + cols[:, None], mask=row_mask[None, :] & col_mask[:, None], other=0.0)


@triton.jit
def _chunk_log_decay(g, rows, row_mask, i_h, H: tl.constexpr):
    """G (cumulative log-decay inside the chunk, [BT]) and G_L (across the whole chunk); padding adds 0."""
    g_c = tl.load(g + rows * H + i_h, mask=row_mask, other=0.0).to(tl.float32)
    return tl.cumsum(g_c, axis=0), tl.sum(g_c, axis=0)


@triton.jit
def _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT: tl.constexpr):
    """Rows (token indices) of chunk i_c, their mask, and the chunk's index into h / dh."""
    i_n, i_t = tl.load(chunk_index + 2 * i_c), tl.load(chunk_index + 2 * i_c + 1)
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    rows = tl.cast(bos + i_t * BT, tl.int64) + tl.arange(0, BT)
    return rows, rows < eos, tl.cast(tl.load(chunk_offsets + i_n) + i_t, tl.int64)


@triton.autotune(configs=_STATE_CONFIGS, key=_KEY)
@triton.jit
def _states_fwd(
    k, v, g, h0, h, ht, cu_seqlens, chunk_offsets,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    offs_k, offs_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    seq_state = tl.cast(i_nh, tl.int64) * K * V  # this sequence and head in [N, H, K, V]

    state = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        state += _tile(h0 + seq_state, offs_k, offs_v, V, mask_k, mask_v).to(tl.float32)
    for i_t in range(tl.cdiv(eos - bos, BT)):
        rows = tl.cast(bos + i_t * BT, tl.int64) + tl.arange(0, BT)
        mask_t = rows < eos
        chunk = tl.cast(first_chunk + i_t, tl.int64)
        h_ptr = h + (chunk * H + i_h) * K * V + offs_k[:, None] * V + offs_v[None, :]
        tl.store(h_ptr, state.to(h.dtype.element_ty), mask=mask_k[:, None] & mask_v[None, :])
        k_t = _tile_t(k + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k)  # [BK, BT]
        v_c = _tile(v + i_h * V, rows, offs_v, H * V, mask_t, mask_v)  # [BT, BV]
        if USE_G:
            G, G_last = _chunk_log_decay(g, rows, mask_t, i_h, H)
            v_c = v_c * tl.exp(G_last - G)[:, None]
            state = state * tl.exp(G_last)
        state += tl.dot(k_t.to(DOT), v_c.to(DOT), input_precision=PRECISION)
    if STORE_FINAL:
        tl.store(ht + seq_state + offs_k[:, None] * V + offs_v[None, :], state, mask=mask_k[:, None] & mask_v[None, :])


@triton.autotune(configs=_CHUNK_CONFIGS, key=_KEY)
@triton.jit
def _output_fwd(
    q, k, v, g, h, o, cu_seqlens, chunk_offsets, chunk_index, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HK)
    rows, mask_t, chunk = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    h_chunk = h + (chunk * H + i_h) * K * V

    o_c = tl.zeros([BT, BV], dtype=tl.float32)  # q_l^T S_in
    scores = tl.zeros([BT, BT], dtype=tl.float32)  # q_l . k_s
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        q_c = _tile(q + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(DOT)  # [BT, BK]
        k_t = _tile_t(k + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(DOT)  # [BK, BT]
        h_c = _tile(h_chunk, offs_k, offs_v, V, mask_k, mask_v).to(DOT)  # [BK, BV]
        o_c += tl.dot(q_c, h_c, input_precision=PRECISION)
        scores += tl.dot(q_c, k_t, input_precision=PRECISION)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    if USE_G:
        G, G_last = _chunk_log_decay(g, rows, mask_t, i_h, H)
        o_c = o_c * tl.exp(G)[:, None]
        scores = scores * tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    scores = tl.where(causal, scores, 0.0)
    v_c = _tile(v + i_h * V, rows, offs_v, H * V, mask_t, mask_v)
    o_c += tl.dot(scores.to(DOT), v_c.to(DOT), input_precision=PRECISION)
    o_ptr = o + i_h * V + rows[:, None] * (H * V) + offs_v[None, :]
    tl.store(o_ptr, (scale * o_c).to(o.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


@triton.autotune(configs=_STATE_CONFIGS, key=_KEY)
@triton.jit
def _state_grads_bwd(
    q, g, do, dht, dh, dh0, cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HK)
    bos, eos = tl.load(cu_seqlens + i_n), tl.load(cu_seqlens + i_n + 1)
    first_chunk = tl.load(chunk_offsets + i_n)
    n_chunks = tl.cdiv(eos - bos, BT)
    offs_k, offs_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    seq_state = tl.cast(i_nh, tl.int64) * K * V

    d_state = tl.zeros([BK, BV], dtype=tl.float32)  # gradient of the state after the current chunk
    if USE_DHT:
        d_state += _tile(dht + seq_state, offs_k, offs_v, V, mask_k, mask_v).to(tl.float32)
    for i_back in range(n_chunks):
        i_t = n_chunks - 1 - i_back
        rows = tl.cast(bos + i_t * BT, tl.int64) + tl.arange(0, BT)
        mask_t = rows < eos
        chunk = tl.cast(first_chunk + i_t, tl.int64)
        dh_ptr = dh + (chunk * H + i_h) * K * V + offs_k[:, None] * V + offs_v[None, :]
        tl.store(dh_ptr, d_state.to(dh.dtype.element_ty), mask=mask_k[:, None] & mask_v[None, :])
        q_t = _tile_t(q + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k)  # [BK, BT]
        do_c = _tile(do + i_h * V, rows, offs_v, H * V, mask_t, mask_v)  # [BT, BV]
        if USE_G:
            G, G_last = _chunk_log_decay(g, rows, mask_t, i_h, H)
            q_t = q_t * tl.exp(G)[None, :]
            d_state = d_state * tl.exp(G_last)
        d_state += scale * tl.dot(q_t.to(DOT), do_c.to(DOT), input_precision=PRECISION)
    if STORE_DH0:
        tl.store(dh0 + seq_state + offs_k[:, None] * V + offs_v[None, :], d_state,
                 mask=mask_k[:, None] & mask_v[None, :])


@triton.autotune(configs=_CHUNK_CONFIGS, key=_KEY)
@triton.jit
def _dv_bwd(
    q, k, g, do, dh, dv, cu_seqlens, chunk_offsets, chunk_index, scale,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HK)
    rows, mask_t, chunk = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    dh_chunk = dh + (chunk * H + i_h) * K * V

    dv_c = tl.zeros([BT, BV], dtype=tl.float32)  # k_s^T dh
    scores_t = tl.zeros([BT, BT], dtype=tl.float32)  # [s, l]: k_s . q_l
    for i_k in range(tl.cdiv(K, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        mask_k = offs_k < K
        k_c = _tile(k + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(DOT)  # [BT, BK]
        q_t = _tile_t(q + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(DOT)  # [BK, BT]
        dh_c = _tile(dh_chunk, offs_k, offs_v, V, mask_k, mask_v).to(DOT)  # [BK, BV]
        dv_c += tl.dot(k_c, dh_c, input_precision=PRECISION)
        scores_t += tl.dot(k_c, q_t, input_precision=PRECISION)
    later = tl.arange(0, BT)[:, None] <= tl.arange(0, BT)[None, :]  # l >= s
    if USE_G:
        G, G_last = _chunk_log_decay(g, rows, mask_t, i_h, H)
        dv_c = dv_c * tl.exp(G_last - G)[:, None]
        scores_t = scores_t * tl.exp(tl.where(later, G[None, :] - G[:, None], float("-inf")))
    scores_t = scale * tl.where(later, scores_t, 0.0)
    do_c = _tile(do + i_h * V, rows, offs_v, H * V, mask_t, mask_v)
    dv_c += tl.dot(scores_t.to(DOT), do_c.to(DOT), input_precision=PRECISION)
    dv_ptr = dv + i_h * V + rows[:, None] * (H * V) + offs_v[None, :]
    tl.store(dv_ptr, dv_c.to(dv.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


@triton.autotune(configs=_CHUNK_CONFIGS, key=_KEY)
@triton.jit
def _dqk_bwd(
    q, k, v, g, h, do, dh, dq, dk, dg, cu_seqlens, chunk_offsets, chunk_index, scale, n_tokens,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_G: tl.constexpr, STORE_DG: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (H // HK)
    rows, mask_t, chunk = _chunk_position(chunk_index, cu_seqlens, chunk_offsets, i_c, BT)
    offs_k = i_k * BK + tl.arange(0, BK)
    mask_k = offs_k < K
    h_chunk = h + (chunk * H + i_h) * K * V
    dh_chunk = dh + (chunk * H + i_h) * K * V

    dq_c = tl.zeros([BT, BK], dtype=tl.float32)  # do_l @ h^T
    dk_c = tl.zeros([BT, BK], dtype=tl.float32)  # v_s @ dh^T
    d_scores = tl.zeros([BT, BT], dtype=tl.float32)  # [l, s]: do_l . v_s
    h_dh = tl.zeros([BK], dtype=tl.float32)  # <h[c], dh[c]>, this K block's rows
    for i_v in range(tl.cdiv(V, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        v_c = _tile(v + i_h * V, rows, offs_v, H * V, mask_t, mask_v).to(DOT)  # [BT, BV]
        do_c = _tile(do + i_h * V, rows, offs_v, H * V, mask_t, mask_v).to(DOT)  # [BT, BV]
        h_t = _tile_t(h_chunk, offs_k, offs_v, V, mask_k, mask_v)  # [BV, BK]
        dh_t = _tile_t(dh_chunk, offs_k, offs_v, V, mask_k, mask_v)  # [BV, BK]
        d_scores += tl.dot(do_c, tl.trans(v_c), input_precision=PRECISION)
        dq_c += tl.dot(do_c, h_t.to(DOT), input_precision=PRECISION)
        dk_c += tl.dot(v_c, dh_t.to(DOT), input_precision=PRECISION)
        if STORE_DG:
            h_dh += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), axis=0)
    q_c = _tile(q + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(tl.float32)
    k_c = _tile(k + i_hk * K, rows, offs_k, HK * K, mask_t, mask_k).to(tl.float32)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    if USE_G:
        G, G_last = _chunk_log_decay(g, rows, mask_t, i_h, H)
        dq_c = dq_c * tl.exp(G)[:, None]
        dk_c = dk_c * tl.exp(G_last - G)[:, None]
        d_scores = d_scores * tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    d_scores = scale * tl.where(causal, d_scores, 0.0)
    dk_state = dk_c
    dq_c = scale * dq_c + tl.dot(d_scores.to(DOT), k_c.to(DOT), input_precision=PRECISION)
    dk_c += tl.dot(tl.trans(d_scores).to(DOT), q_c.to(DOT), input_precision=PRECISION)
    out = i_h * K + rows[:, None] * (H * K) + offs_k[None, :]
    tl.store(dq + out, dq_c.to(dq.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])
    tl.store(dk + out, dk_c.to(dk.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])
    if STORE_DG:
        dG = tl.sum(q_c * dq_c - k_c * dk_c, axis=1)  # [BT]
        carried = tl.exp(G_last) * tl.sum(h_dh, axis=0) + tl.sum(tl.sum(k_c * dk_state, axis=1), axis=0)
        dg_c = tl.cumsum(dG, axis=0, reverse=True) + carried
        tl.store(dg + tl.cast(i_k, tl.int64) * n_tokens * H + rows * H + i_h, dg_c, mask=mask_t)


class _Chunks:
    """Where the chunks are: per sequence its token range (cu_seqlens, int32 [N + 1]) and its first chunk
    (chunk_offsets, int32 [N + 1]); per chunk its (sequence, chunk within the sequence) (chunk_index, [C, 2])."""

    def __init__(self, batch: int, seq_len: int, cu_seqlens: Tensor | None, chunk_size: int, device: torch.device):
        if cu_seqlens is None:
            per_seq = triton.cdiv(seq_len, chunk_size)
            seqs = torch.arange(batch + 1, device=device, dtype=torch.int32)
            self.cu_seqlens, self.chunk_offsets = seqs * seq_len, seqs * per_seq
            counts = torch.full((batch,), per_seq, device=device)
            self.n_seqs, self.n_chunks = batch, batch * per_seq
        else:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            counts = (lengths + chunk_size - 1) // chunk_size
            self.cu_seqlens = cu_seqlens.to(torch.int32)
            self.chunk_offsets = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
            self.n_seqs, self.n_chunks = len(lengths), int(self.chunk_offsets[-1])
        seq = torch.repeat_interleave(torch.arange(self.n_seqs, device=device), counts, output_size=self.n_chunks)
        within = torch.arange(self.n_chunks, device=device) - self.chunk_offsets.long()[seq]
        self.chunk_index = torch.stack([seq, within], 1).to(torch.int32).contiguous()


def _dot_dtype(dtype: torch.dtype):
    """bf16 dots for bf16 inputs; fp32 otherwise: fp16 would overflow on large states (tf32 keeps fp16's mantissa)."""
    return tl.bfloat16 if dtype == torch.bfloat16 and not INTERPRET else tl.float32


def _launch_args(k: Tensor, v: Tensor, chunk_size: int, use_g: bool) -> dict:
    """The constants every kernel takes; k [B * T, Hk, K], v [B * T, H, V]."""
    dot = _dot_dtype(k.dtype)
    return dict(
        H=v.shape[1], HK=k.shape[1], K=k.shape[2], V=v.shape[2], BT=chunk_size, USE_G=use_g, DOT=dot,
        PRECISION="ieee" if k.dtype == torch.float32 or INTERPRET else "tf32",
    )


def _block(dim: int) -> int:
    return min(64, max(16, triton.next_power_of_2(dim)))


def _states_forward(k, v, g, initial_state, chunks: _Chunks, chunk_size: int, store_final: bool):
    """h [C, H, K, V] (each chunk's starting state) and the final states [N, H, K, V] fp32 (or None)."""
    args = _launch_args(k, v, chunk_size, g is not None)
    K, V, H = args["K"], args["V"], args["H"]
    h = k.new_empty(chunks.n_chunks, H, K, V, dtype=torch.bfloat16 if k.dtype == torch.bfloat16 else torch.float32)
    final = k.new_empty(chunks.n_seqs, H, K, V, dtype=torch.float32) if store_final else None
    grid = lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), chunks.n_seqs * H)  # noqa: E731
    _states_fwd[grid](
        k, v, g, initial_state, h, final, chunks.cu_seqlens, chunks.chunk_offsets,
        USE_H0=initial_state is not None, STORE_FINAL=store_final, **args,
    )
    return h, final


class _TritonSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, cu_seqlens, chunk_size):
        batch, seq_len = q.shape[:2]
        chunks = _Chunks(batch, seq_len, cu_seqlens, chunk_size, q.device)
        qf, kf, vf = (x.flatten(0, 1).contiguous() for x in (q, k, v))
        gf = None if g is None else g.flatten(0, 1).float().contiguous()
        h0 = None if initial_state is None else initial_state.float().contiguous()
        h, final = _states_forward(kf, vf, gf, h0, chunks, chunk_size, store_final=True)
        args = _launch_args(kf, vf, chunk_size, g is not None)
        o = torch.empty_like(vf)
        grid = (triton.cdiv(args["V"], _block(args["V"])), chunks.n_chunks, args["H"])
        _output_fwd[grid](
            qf, kf, vf, gf, h, o, chunks.cu_seqlens, chunks.chunk_offsets, chunks.chunk_index, scale,
            BK=_block(args["K"]), BV=_block(args["V"]), **args,
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(qf, kf, vf, gf, h0)
        ctx.chunks, ctx.scale, ctx.chunk_size, ctx.shapes = chunks, scale, chunk_size, (q.shape, v.shape)
        ctx.g_dtype = None if g is None else g.dtype
        return o.view(v.shape), final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, h0 = ctx.saved_tensors
        chunks, scale, chunk_size = ctx.chunks, ctx.scale, ctx.chunk_size
        (batch, seq_len, n_groups, K), v_shape = ctx.shapes
        H, V = v_shape[2], v_shape[3]
        per_group = H // n_groups
        d_o = torch.zeros_like(v) if d_o is None else d_o.flatten(0, 1).contiguous()
        d_final = None if d_final is None else d_final.float().contiguous()
        args = _launch_args(k, v, chunk_size, g is not None)
        want_dg = g is not None and ctx.needs_input_grad[3]
        want_dh0 = h0 is not None and ctx.needs_input_grad[4]

        h, _ = _states_forward(k, v, g, h0, chunks, chunk_size, store_final=False)
        dh = torch.empty_like(h)
        dh0 = torch.empty_like(h0) if want_dh0 else None
        grid = lambda meta: (triton.cdiv(K, meta["BK"]), triton.cdiv(V, meta["BV"]), chunks.n_seqs * H)  # noqa: E731
        _state_grads_bwd[grid](
            q, g, d_o, d_final, dh, dh0, chunks.cu_seqlens, chunks.chunk_offsets, scale,
            USE_DHT=d_final is not None, STORE_DH0=want_dh0, **args,
        )

        BK, BV = _block(K), _block(V)
        dv = torch.empty_like(v)
        _dv_bwd[(triton.cdiv(V, BV), chunks.n_chunks, H)](
            q, k, g, d_o, dh, dv, chunks.cu_seqlens, chunks.chunk_offsets, chunks.chunk_index, scale,
            BK=BK, BV=BV, **args,
        )
        # per value head; summed over each group below
        per_head_dtype = q.dtype if per_group == 1 else torch.float32
        dq = q.new_empty(q.shape[0], H, K, dtype=per_head_dtype)
        dk = torch.empty_like(dq)
        n_k_blocks = triton.cdiv(K, BK)
        dg = q.new_empty(n_k_blocks, q.shape[0], H, dtype=torch.float32) if want_dg else None
        _dqk_bwd[(n_k_blocks, chunks.n_chunks, H)](
            q, k, v, g, h, d_o, dh, dq, dk, dg, chunks.cu_seqlens, chunks.chunk_offsets, chunks.chunk_index,
            scale, q.shape[0], BK=BK, BV=BV, STORE_DG=want_dg, **args,
        )
        if per_group > 1:
            dq = dq.view(-1, n_groups, per_group, K).sum(2).to(q.dtype)
            dk = dk.view(-1, n_groups, per_group, K).sum(2).to(k.dtype)
        if want_dg:
            dg = dg.sum(0).view(batch, seq_len, H).to(ctx.g_dtype)
        q_shape = (batch, seq_len, n_groups, K)
        return dq.view(q_shape), dk.view(q_shape), dv.view(v_shape), dg, dh0, None, None, None


def ssd_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of `lctk.kernels.ssd.ssd` (inputs already checked). The chunk length is chunk_size rounded
    to a power of two in [16, 64]: larger [BT, BT] tiles do not fit in registers, and the result does not depend on it."""
    block_t = min(64, max(16, triton.next_power_of_2(chunk_size)))
    o, final = _TritonSSD.apply(q, k, v, g, initial_state, float(scale), cu_seqlens, block_t)
    return o, final if output_final_state else None
