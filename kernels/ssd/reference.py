"""Chunked linear recurrence with a scalar per-head decay (state space duality), in plain torch.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          state   [K, V] per head
    o_t = scale * q_t^T S_t                       output  [V]    (the current token is included)

Shapes: q, k [B, T, Hk, K]; v [B, T, H, V]; g [B, T, H] (log-decay, <= 0; None means no decay);
states [N, H, K, V] fp32 (fp64 for fp64 inputs). Value head h reads q/k head h // (H // Hk) (Mamba-2's n_groups, GQA for linear attention).

The sequence is cut into chunks of L tokens. With G_l the cumulative log-decay from the chunk start to l (inclusive)
and S_in the state carried into the chunk, every chunk computes

    1. o_l   = sum_{s <= l} (q_l . k_s) exp(G_l - G_s) v_s                    inside the chunk (a masked "attention")
    2. C     = sum_s exp(G_L - G_s) k_s v_s^T                                  what the chunk adds to the state
    3. S_in' = exp(G_L) S_in + C                                              state passed to the next chunk (a loop)
    4. o_l  += exp(G_l) q_l^T S_in                                            the carried-in state seen from l

This is the ground truth for the Triton kernels and the CPU training path. To keep that path lean, the backward pass
is written by hand (`_ChunkedSSD`): it saves only the inputs and the carried-in states S_in and recomputes the
[L, L] matrices of step 1, where autograd would keep several of them per head. With do the output gradient times
scale, M_ls = (q_l . k_s) exp(G_l - G_s) and S_out = S_in' the state after the chunk:

    4. dq_l += exp(G_l) do_l S_in^T        dS_in = sum_l exp(G_l) q_l do_l^T + exp(G_L) dS_out   (a backward loop)
    2. dk_s += exp(G_L - G_s) v_s dS_out^T  dv_s += exp(G_L - G_s) k_s^T dS_out
    1. dv_s += sum_l M_ls do_l              dq, dk from dM_ls = do_l . v_s times exp(G_l - G_s)
    dG: every exp(x) term adds (its gradient) * exp(x) to the G's in x, with their signs; G_l = sum_{s <= l} g_s,
        so dg_s = sum_{l >= s} dG_l within the chunk.

Layout: every sequence (a batch row, or one of the cu_seqlens pieces of a single row) is laid out in whole chunks,
zero-padded at its end (k = 0, g = 0 leave the state as it is), so no chunk straddles two sequences. Chunk tensors
are chunk-major: [n, Hk, L, K] for q/k and [n, Hk, R, L, V] for v, with R = H // Hk value heads per q/k head, so one
batched matmul serves every (chunk, head). Chunks are processed in blocks of n (about _BLOCK_TOKENS tokens), which
bounds the temporaries whatever the sequence length; only the carried-in states [C, Hk, R, K, V] span all C chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Reference chunked SSD. Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] or None). The arithmetic
    and the states are float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # of the arithmetic and the states
    layout = _Layout.build(q.shape[0], q.shape[1], cu_seqlens, chunk_size, dtype, q.device)
    o, final_state = _ChunkedSSD.apply(q, k, v, g, initial_state, scale, layout)
    return o, final_state if output_final_state else None


# Chunks handled together by one batched matmul: bounds the [L, L] temporaries whatever the sequence length.
_BLOCK_TOKENS = 512


@dataclass
class _Layout:
    """Where each token sits among the chunks. The C chunks form a [W, S] grid walked step by step along S by the
    state-passing loop: W = B rows of S chunks each without cu_seqlens, W = 1 row of all chunks with them."""

    batch: int
    seq_len: int
    chunk_size: int
    dtype: torch.dtype  # of the arithmetic: float32, or float64 for float64 inputs
    n_seqs: int  # N: rows of the initial and final states
    width: int
    steps: int
    src: Tensor | None  # [C * L] token (of the B * T) at every chunk position, -1 for padding; None = plain reshape
    starts: dict[int, slice]  # step -> the sequences (rows of the initial state) that start at it
    ends: dict[int, slice]  # step -> the sequences that end at it

    @staticmethod
    def build(
        batch: int, seq_len: int, cu_seqlens: Tensor | None, chunk_size: int, dtype: torch.dtype, device: torch.device
    ) -> _Layout:
        if cu_seqlens is None:
            steps = -(-seq_len // chunk_size)
            every = slice(0, batch)
            layout = _Layout(batch, seq_len, chunk_size, dtype, batch, batch, steps, None, {0: every}, {steps - 1: every})
            if seq_len % chunk_size:
                starts = torch.arange(batch, device=device) * steps * chunk_size
                layout.src = _invert(starts, torch.full((batch,), seq_len, device=device), layout.n_chunks * chunk_size)
            return layout
        offsets = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
        counts = [max(1, -(-n // chunk_size)) for n in lengths]
        first = [sum(counts[:n]) for n in range(len(counts))]
        starts = {f: slice(n, n + 1) for n, f in enumerate(first)}
        ends = {f + c - 1: slice(n, n + 1) for n, (f, c) in enumerate(zip(first, counts))}
        layout = _Layout(batch, seq_len, chunk_size, dtype, len(lengths), 1, sum(counts), None, starts, ends)
        to_tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
        layout.src = _invert(to_tensor(first) * chunk_size, to_tensor(lengths), layout.n_chunks * chunk_size)
        return layout

    @property
    def n_chunks(self) -> int:
        return self.width * self.steps

    def blocks(self) -> list[slice]:
        per_block = max(1, _BLOCK_TOKENS // self.chunk_size)
        return [slice(c, min(c + per_block, self.n_chunks)) for c in range(0, self.n_chunks, per_block)]

    def gather(self, x: Tensor, chunks: slice) -> Tensor:
        """Chunks `chunks` of x [B, T, H, D] as [n, H, L, D] in self.dtype (or of [B, T, H] as [n, H, L]), zero-padded."""
        flat = x.flatten(0, 1)
        rows = slice(chunks.start * self.chunk_size, chunks.stop * self.chunk_size)
        if self.src is None:
            part = flat[rows]
        else:
            src = self.src[rows]
            part = flat.index_select(0, src.clamp(min=0))
            part[src < 0] = 0
        return part.unflatten(0, (-1, self.chunk_size)).transpose(1, 2).to(self.dtype).contiguous()

    def scatter(self, out: Tensor, x: Tensor, chunks: slice) -> None:
        """Write chunks x [n, H, L, D] (or [n, H, L]) into their tokens of out [B * T, H, D] (or [B * T, H])."""
        rows = slice(chunks.start * self.chunk_size, chunks.stop * self.chunk_size)
        if self.src is None:
            out[rows].unflatten(0, (-1, self.chunk_size)).copy_(x.transpose(1, 2))
        else:
            src = self.src[rows]
            keep = src >= 0
            out.index_copy_(0, src[keep], x.transpose(1, 2).flatten(0, 1)[keep].to(out.dtype))


def _invert(chunk_starts: Tensor, lengths: Tensor, n_positions: int) -> Tensor:
    """Sequence n's tokens (consecutive among the B * T) sit from position chunk_starts[n] on: the token index at
    every position, -1 for padding."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    token = torch.arange(len(seq), device=lengths.device)
    first_token = torch.cumsum(lengths, 0) - lengths
    src = torch.full((n_positions,), -1, dtype=torch.long, device=lengths.device)
    src[chunk_starts[seq] + token - first_token[seq]] = token
    return src


class _ChunkedSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, layout):
        n_groups, per_group = q.shape[2], v.shape[2] // q.shape[2]
        G = _cumulative_log_decay(g, v, layout, n_groups)  # [C, Hk, R, L]
        G_last = G[..., -1]  # [C, Hk, R] log-decay across the whole chunk

        # 2. what each chunk alone adds to the state at its end: sum_s exp(G_L - G_s) k_s v_s^T
        states = q.new_empty(layout.n_chunks, n_groups, per_group, q.shape[-1], v.shape[-1], dtype=layout.dtype)
        for chunks in layout.blocks():
            kc = layout.gather(k, chunks).unsqueeze(2)  # [n, Hk, 1, L, K]
            vc = layout.gather(v, chunks).unflatten(1, (n_groups, per_group))  # [n, Hk, R, L, V]
            to_end = torch.exp(G_last[chunks, ..., None] - G[chunks]).unsqueeze(-1)  # [n, Hk, R, L, 1]
            torch.matmul(kc.mT, vc * to_end, out=states[chunks])  # [n, Hk, R, K, V]

        # 3. pass the state from chunk to chunk; `states` now holds what each chunk starts from
        if initial_state is None:
            initial = states.new_zeros(layout.n_seqs, *states.shape[1:])
        else:
            initial = initial_state.to(layout.dtype).unflatten(1, (n_groups, per_group))  # [N, Hk, R, K, V]
        final = _pass_states(states, G_last, initial, layout)  # [N, Hk, R, K, V]

        o = v.new_empty(v.shape).flatten(0, 1)  # [B * T, H, V]
        for chunks in layout.blocks():
            qc, kc = layout.gather(q, chunks).unsqueeze(2), layout.gather(k, chunks).unsqueeze(2)  # [n, Hk, 1, L, K]
            vc = layout.gather(v, chunks).unflatten(1, (n_groups, per_group))  # [n, Hk, R, L, V]
            Gc = G[chunks]  # [n, Hk, R, L]
            # 1. inside each chunk: o_l = sum_{s <= l} (q_l . k_s) exp(G_l - G_s) v_s
            scores = qc @ kc.mT  # [n, Hk, 1, L, L], shared by the group's value heads
            oc = (scores * _causal_decay(Gc)) @ vc  # [n, Hk, R, L, V]
            # 4. the carried-in state seen from each position: o_l += exp(G_l) q_l^T S_in
            oc += (qc @ states[chunks]).mul_(torch.exp(Gc).unsqueeze(-1))
            layout.scatter(o, oc.mul_(scale).flatten(1, 2), chunks)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.layout, ctx.has_initial = scale, layout, initial_state is not None
        return o.view(v.shape), final.flatten(1, 2)  # [B, T, H, V], [N, H, K, V]

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, states_in = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        n_groups, per_group = q.shape[2], v.shape[2] // q.shape[2]
        if d_o is None:  # only the final state was used
            d_o = torch.zeros_like(v)
        G = _cumulative_log_decay(g, v, layout, n_groups)
        G_last = G[..., -1]

        def gather_do(chunks: slice) -> Tensor:  # scale folded into do once: [n, Hk, R, L, V]
            return layout.gather(d_o, chunks).mul_(scale).unflatten(1, (n_groups, per_group))

        # 4, the state's share: dS_in = sum_l exp(G_l) q_l do_l^T
        d_states = torch.empty_like(states_in)  # [C, Hk, R, K, V]
        for chunks in layout.blocks():
            qc = layout.gather(q, chunks).unsqueeze(2)  # [n, Hk, 1, L, K]
            do_seen = gather_do(chunks).mul_(torch.exp(G[chunks]).unsqueeze(-1))
            torch.matmul(qc.mT, do_seen, out=d_states[chunks])

        # 3. walked backwards; `d_states` now holds the gradient of the state after each chunk
        if d_final is not None:
            d_final = d_final.to(layout.dtype).unflatten(1, (n_groups, per_group))  # [N, Hk, R, K, V]
        d_initial = _pass_states_backward(d_states, G_last, d_final, layout)

        dq, dk, dv = (torch.empty_like(x).flatten(0, 1) for x in (q, k, v))
        dG = torch.empty_like(G)  # gradient w.r.t. the cumulative log-decay G: one share per exp(...) it enters
        for chunks in layout.blocks():
            qc, kc = layout.gather(q, chunks).unsqueeze(2), layout.gather(k, chunks).unsqueeze(2)  # [n, Hk, 1, L, K]
            vc = layout.gather(v, chunks).unflatten(1, (n_groups, per_group))  # [n, Hk, R, L, V]
            do = gather_do(chunks)
            Gc, S_in, dS_out = G[chunks], states_in[chunks], d_states[chunks]  # [n, Hk, R, L], [n, Hk, R, K, V] x2
            # 4. o_l += exp(G_l) q_l^T S_in
            dq_heads = (do * torch.exp(Gc).unsqueeze(-1)) @ S_in.mT  # [n, Hk, R, L, K], one per value head
            dGc = (dq_heads * qc).sum(-1)  # [n, Hk, R, L] share of exp(G_l): do_l . (exp(G_l) q_l^T S_in)
            dqc = dq_heads.sum(2)  # [n, Hk, L, K]
            # 2 and 3. S_out = exp(G_L) S_in + sum_s k_s (exp(G_L - G_s) v_s)^T
            to_end = torch.exp(G_last[chunks, ..., None] - Gc).unsqueeze(-1)  # [n, Hk, R, L, 1]
            d_v_to_end = kc @ dS_out  # [n, Hk, R, L, V]
            dvc = d_v_to_end * to_end
            dkc = ((vc * to_end) @ dS_out.mT).sum(2)  # [n, Hk, L, K]
            d_to_end = (d_v_to_end * vc).sum(-1) * to_end.squeeze(-1)  # share of exp(G_L - G_s): -G_s, +G_L
            d_passed = (dS_out * S_in).sum((-2, -1)) * torch.exp(G_last[chunks])  # share of exp(G_L) S_in
            dGc -= d_to_end
            dGc[..., -1] += d_to_end.sum(-1) + d_passed
            # 1. o_l = sum_{s <= l} (q_l . k_s) exp(G_l - G_s) v_s
            decay = _causal_decay(Gc)  # [n, Hk, R, L, L]
            masked = (qc @ kc.mT) * decay
            d_masked = do @ vc.mT
            dvc += masked.mT @ do
            d_scores = (d_masked * decay).sum(2, keepdim=True)  # [n, Hk, 1, L, L]
            dqc += (d_scores @ kc).squeeze(2)
            dkc += (d_scores.mT @ qc).squeeze(2)
            d_decay = d_masked.mul_(masked)  # share of exp(G_l - G_s): +G_l, -G_s
            dGc += d_decay.sum(-1) - d_decay.sum(-2)
            layout.scatter(dq, dqc, chunks)
            layout.scatter(dk, dkc, chunks)
            layout.scatter(dv, dvc.flatten(1, 2), chunks)
            dG[chunks] = dGc

        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dg = g.new_empty(g.shape).flatten(0, 1)
            # G_l = sum_{s <= l} g_s, so dg_s = sum_{l >= s} dG_l
            layout.scatter(dg, dG.flip(-1).cumsum(-1).flip(-1).flatten(1, 2), slice(0, layout.n_chunks))
            dg = dg.view(g.shape)
        d_initial = d_initial.flatten(1, 2) if ctx.has_initial else None
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dg, d_initial, None, None


def _cumulative_log_decay(g: Tensor | None, v: Tensor, layout: _Layout, n_groups: int) -> Tensor:
    """G [C, Hk, R, L]: log-decay from the chunk start to l, inclusive (zeros without g)."""
    if g is None:
        return v.new_zeros(layout.n_chunks, v.shape[2], layout.chunk_size, dtype=layout.dtype).unflatten(1, (n_groups, -1))
    return layout.gather(g, slice(0, layout.n_chunks)).cumsum(-1).unflatten(1, (n_groups, -1))


def _causal_decay(G: Tensor) -> Tensor:
    """exp(G_l - G_s) for s <= l, 0 above the diagonal: [..., L] -> [..., L, L]. Above the diagonal the exponent is
    positive and may overflow to inf, which tril replaces by 0."""
    return torch.exp(G.unsqueeze(-1) - G.unsqueeze(-2)).tril_()


def _pass_states(states: Tensor, G_last: Tensor, initial: Tensor, layout: _Layout) -> Tensor:
    """In place, chunk states [C, Hk, R, K, V] -> the state each chunk starts from:
    S_in[c + 1] = exp(G_last[c]) S_in[c] + C[c], restarting from `initial` [N, Hk, R, K, V] at each sequence's first
    chunk. Returns the final states [N, Hk, R, K, V]."""
    grid = states.unflatten(0, (layout.width, layout.steps))  # [W, S, Hk, R, K, V]
    decay = torch.exp(G_last).unflatten(0, (layout.width, layout.steps))[..., None, None]  # [W, S, Hk, R, 1, 1]
    final = torch.empty_like(initial)
    state = initial
    for step in range(layout.steps):
        if step in layout.starts:
            state = initial[layout.starts[step]]
        state_out = torch.addcmul(grid[:, step], decay[:, step], state)
        grid[:, step] = state
        state = state_out
        if step in layout.ends:
            final[layout.ends[step]] = state
    return final


def _pass_states_backward(d_states: Tensor, G_last: Tensor, d_final: Tensor | None, layout: _Layout) -> Tensor:
    """The loop of _pass_states walked backwards. In place, d_states [C, Hk, R, K, V]: the direct gradient of each
    chunk's carried-in state -> the gradient of the state after the chunk (= of the chunk's own state C[c]).
    Returns the gradient of the initial states [N, Hk, R, K, V]."""
    grid = d_states.unflatten(0, (layout.width, layout.steps))
    decay = torch.exp(G_last).unflatten(0, (layout.width, layout.steps))[..., None, None]
    d_initial = d_states.new_empty(layout.n_seqs, *d_states.shape[1:])
    d_state = None
    for step in reversed(range(layout.steps)):
        if step in layout.ends:  # the state after this chunk only reaches the final state
            rows = layout.ends[step]
            d_state = d_final[rows] if d_final is not None else torch.zeros_like(d_initial[rows])
        d_state_in = torch.addcmul(grid[:, step], decay[:, step], d_state)
        grid[:, step] = d_state
        d_state = d_state_in
        if step in layout.starts:
            d_initial[layout.starts[step]] = d_state
    return d_initial


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
