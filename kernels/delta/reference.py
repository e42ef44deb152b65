"""The gated delta rule in plain torch: a token-by-token recurrence (the twin, ground truth of the tests) and a chunked
form through the WY / UT transform (the CPU training path).

    S_t = (I - b_t k_t k_t^T) D_t S_{t-1} + b_t k_t v_t^T      state   [K, V] per head
    o_t = scale * q_t^T S_t                                     output  [V]    (the current token is included)

D_t = diag(exp(g_t)) with g_t the log-decay: one scalar per head (Gated DeltaNet, g [B, T, H]), one per key channel
(Kimi Delta Attention, g [B, T, H, K]), or none (g = None: the plain delta rule). Written with the state as [V, K]
(S^T) this is S_t = S_{t-1} D_t (I - b_t k_t k_t^T) + b_t v_t k_t^T, the papers' form. b_t in [0, 1] is the write
strength; with unit-norm k_t, the state's reading at k_t moves a fraction b_t of the way to v_t.
Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; states [N, H, K, V] fp32 (fp64 for fp64 inputs).

Chunks of L tokens. Within a chunk, G_l is the cumulative log-decay from the chunk start to l (inclusive, per
channel for K), Gamma_l = exp(G_l), and S_0 the state carried in. The write of token l is delta_l = b_l (v_l -
k_l^T D_l S_{l-1}) (S_l = D_l S_{l-1} + k_l delta_l^T), so S_l = Gamma_l S_0 + sum_{s <= l} (Gamma_l / Gamma_s) k_s
delta_s^T and the writes solve a unit lower-triangular system:

    1. A_ls   = b_l k_l^T diag(Gamma_l / Gamma_s) k_s   (s < l)   [L, L]  how earlier writes change what l reads
    2. (I + A) [W | U] = [b * Gamma k | b * v]                  [L, K + V]  the UT transform (one triangular solve)
    3. delta  = U - W S_0                                       [L, V]  the writes, given the carried-in state
    4. S_L    = Gamma_L S_0 + sum_s (Gamma_L / Gamma_s) k_s delta_s^T          the state passed on (a loop)
    5. o_l    = scale ((Gamma_l q_l)^T S_0 + sum_{s <= l} q_l^T diag(Gamma_l / Gamma_s) k_s delta_s)

Every exp() above has a non-positive argument (Gamma_l / Gamma_s with s <= l), so nothing overflows however fast a
channel forgets. For a scalar decay the [L, L] factors are (k k^T) * exp(G_l - G_s); for a per-channel decay they are
sums over K of k_l k_s exp(G_l - G_s) per channel. Factoring those as (k_l Gamma_l) . (k_s / Gamma_s) would overflow
(1 / Gamma_s reaches exp(80) within a few tokens of a fast channel), so the chunk is cut into sub-blocks of 16 rows:
inside one, exact [16, 16, K] products; against earlier columns, a matmul of factors taken relative to the sub-block's
boundary, exp(G_l - G_b) and exp(G_b - G_s), both <= 1. They are recomputed in backward rather than kept.
Gradients come from autograd: the loop of step 4 keeps one state per chunk, steps 1-3 and 5 a few [L, L] and [L, D]
tensors per chunk, like the SSD reference's carried states (kernels/ssd/reference.py).

Layout as the SSD reference: every sequence (a batch row, or a cu_seqlens piece of one row) in whole chunks,
zero-padded at its end (k = 0, b = 0, g = 0 leave the state as it is).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..ssd.reference import _Layout

# Per-channel decay: chunks whose [L, L, K] decay products are formed at once (bounds that temporary)
_PAIR_ELEMENTS = 1 << 22


def delta_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The chunked delta rule (module doc). Returns (o [B, T, H, V] in v's dtype, final states [N, H, K, V] or None)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = _Layout.build(q.shape[0], q.shape[1], cu_seqlens, chunk_size, dtype, q.device)
    every = slice(0, layout.n_chunks)
    qc, kc, vc = (layout.gather(x, every) for x in (q, k, v))  # [C, H, L, K], [C, H, L, K], [C, H, L, V]
    bc = layout.gather(beta, every)  # [C, H, L]
    per_channel = g is not None and g.dim() == 4
    if g is None:
        G = bc.new_zeros(bc.shape).unsqueeze(-1)  # [C, H, L, 1]
    else:
        G = layout.gather(g, every).cumsum(2)  # [C, H, L, K] or [C, H, L]
        G = G if per_channel else G.unsqueeze(-1)

    # 1. A (strictly below the diagonal) and the output's Q K^T factor (on and below it)
    if per_channel:
        kk, qk = _pair_products(kc, qc, G)
    else:
        decay = _causal_decay(G.squeeze(-1), strict=False)  # [C, H, L, L]
        kk, qk = (kc @ kc.mT) * decay, (qc @ kc.mT) * decay
    A = (bc.unsqueeze(-1) * kk).tril(-1)  # [C, H, L, L]
    # 2. the UT transform: W = (I + A)^-1 (b Gamma k), U = (I + A)^-1 (b v)
    unit = torch.eye(layout.chunk_size, dtype=dtype, device=q.device)
    rhs = bc.unsqueeze(-1) * torch.cat([torch.exp(G) * kc, vc], dim=-1)  # [C, H, L, K + V]
    W, U = torch.linalg.solve_triangular(A + unit, rhs, upper=False, unitriangular=True).split(
        [kc.shape[-1], vc.shape[-1]], dim=-1
    )
    # 3 and 4. the state from chunk to chunk
    to_end = torch.exp(G[:, :, -1:] - G) * kc  # [C, H, L, K]: (Gamma_L / Gamma_s) k_s
    passed = torch.exp(G[:, :, -1]).unsqueeze(-1)  # [C, H, K or 1, 1]: Gamma_L
    states_in, deltas, final = _pass_states(W, U, to_end, passed, initial_state, layout, dtype)
    # 5. every chunk's outputs at once
    o = torch.exp(G) * qc @ states_in + qk @ deltas  # [C, H, L, V]
    out = v.new_empty(v.shape).flatten(0, 1)
    layout.scatter(out, (scale * o).to(v.dtype), every)
    return out.view(v.shape), final if output_final_state else None


def _causal_decay(G: Tensor, strict: bool) -> Tensor:
    """exp(G_l - G_s) for s <= l (s < l when strict), 0 elsewhere: [..., L] -> [..., L, L]. The exponent is masked
    before exp, so the zeros have zero gradient (above the diagonal it is positive and could overflow)."""
    length = G.shape[-1]
    keep = torch.ones(length, length, dtype=torch.bool, device=G.device).tril(-1 if strict else 0)
    return torch.exp((G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~keep, float("-inf")))


def _pair_products(k: Tensor, q: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel decay: sum_d x_l[d] k_s[d] exp(G_l[d] - G_s[d]) for s <= l, for x = k and x = q.
    k, q, G [C, H, L, K] -> two [C, H, L, L]. Blocks of chunks bound the temporaries; under autograd each block is
    recomputed in backward instead of kept."""
    per_chunk = k[0].numel() * _sub_block(k.shape[2])
    step = max(1, _PAIR_ELEMENTS // per_chunk)
    parts = []
    for start in range(0, k.shape[0], step):
        block = slice(start, start + step)
        args = (k[block], q[block], G[block])
        if torch.is_grad_enabled() and any(t.requires_grad for t in args):
            parts.append(checkpoint(_pair_block, *args, use_reentrant=False))
        else:
            parts.append(_pair_block(*args))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _sub_block(length: int) -> int:
    return 16 if length % 16 == 0 else length


def _pair_block(k: Tensor, q: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """The chunk in sub-blocks of R = 16 rows. Inside a sub-block: exact [R, R, K] decays. Rows of sub-block i
    against the columns before it: exp(G_l - G_s) = exp(G_l - G_b) exp(G_b - G_s) with G_b at the last column before
    the sub-block, both factors <= 1, so a matmul."""
    n, heads, length, key_dim = k.shape
    size = _sub_block(length)
    count = length // size
    ks, qs, Gs = (x.unflatten(2, (count, size)) for x in (k, q, G))  # [n, H, m, R, K]
    keep = torch.ones(size, size, dtype=torch.bool, device=G.device).tril()[..., None]  # [R, R, 1]
    decay = torch.exp((Gs.unsqueeze(4) - Gs.unsqueeze(3)).masked_fill(~keep, float("-inf")))  # [n, H, m, R, R, K]
    weighted = decay * ks.unsqueeze(3)  # k_s[d] exp(G_l[d] - G_s[d])
    diagonal = [(weighted * x.unsqueeze(4)).sum(-1) for x in (ks, qs)]  # 2 x [n, H, m, R, R]
    rows = ([], [])
    for i in range(count):
        before = i * size
        if before:
            boundary = G[:, :, before - 1 : before]  # [n, H, 1, K]
            earlier = k[:, :, :before] * torch.exp(boundary - G[:, :, :before])  # [n, H, iR, K]
            to_row = torch.exp(Gs[:, :, i] - boundary)  # [n, H, R, K]
        for out, x, diag in zip(rows, (ks, qs), diagonal):
            pieces = [x[:, :, i] * to_row @ earlier.mT] if before else []
            pieces += [diag[:, :, i], diag.new_zeros(n, heads, size, length - before - size)]
            out.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows[0], dim=2), torch.cat(rows[1], dim=2)


def _pass_states(
    W: Tensor, U: Tensor, to_end: Tensor, passed: Tensor, initial_state: Tensor | None, layout: _Layout, dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 3 and 4 chunk by chunk along each sequence. W, to_end [C, H, L, K]; U [C, H, L, V]; passed
    [C, H, K or 1, 1]. Returns (the state each chunk starts from [C, H, K, V], the writes delta [C, H, L, V], the
    final states [N, H, K, V])."""
    grid = [x.unflatten(0, (layout.width, layout.steps)) for x in (W, U, to_end, passed)]  # [W, S, ...]
    heads, key_dim, value_dim = W.shape[1], W.shape[-1], U.shape[-1]
    if initial_state is None:
        initial = W.new_zeros(layout.n_seqs, heads, key_dim, value_dim)
    else:
        initial = initial_state.to(dtype)
    states_in, deltas, finals = [], [], {}
    state = initial
    for step in range(layout.steps):
        if step in layout.starts:
            state = initial[layout.starts[step]]
        w, u, k_to_end, decay = (x[:, step] for x in grid)
        delta = u - w @ state  # [W, H, L, V]
        states_in.append(state)
        deltas.append(delta)
        state = decay * state + k_to_end.mT @ delta
        if step in layout.ends:
            finals[layout.ends[step].start] = state
    order = [finals[n] for n in sorted(finals)]
    final = torch.cat(order) if layout.width == 1 else order[0]
    stack = lambda xs: torch.stack(xs, 1).flatten(0, 1)  # noqa: E731  [W, S, ...] -> [C, ...]
    return stack(states_in), stack(deltas), final


def delta_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence one token at a time, in float32 (float64 for float64 inputs). Returns (o [B, T, H, V] in v's
    dtype, final states [N, H, K, V])."""
    batch, seq_len, heads, key_dim = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        pieces = [(b, 0, seq_len) for b in range(batch)]
    else:
        offsets = cu_seqlens.tolist()
        pieces = [(0, start, end) for start, end in zip(offsets[:-1], offsets[1:])]
    outputs = [[None] * seq_len for _ in range(batch)]
    finals = []
    for n, (row, start, end) in enumerate(pieces):
        if initial_state is None:
            state = q.new_zeros(heads, key_dim, v.shape[-1], dtype=dtype)
        else:
            state = initial_state[n].to(dtype)
        for t in range(start, end):
            decay = None if g is None else g[row, t]
            o, state = _step(q[row, t], k[row, t], v[row, t], decay, beta[row, t], state, scale)
            outputs[row][t] = o
        finals.append(state)
    o = torch.stack([torch.stack(row) for row in outputs])
    return o.to(v.dtype), torch.stack(finals)


def _step(q, k, v, g, beta, state, scale):
    """One token, out of place: q, k [..., H, K]; v [..., H, V]; g [..., H] or [..., H, K] or None; beta [..., H];
    state [..., H, K, V]. Returns (o [..., H, V] in the state's dtype, the new state)."""
    q, k, v, beta = (x.to(state.dtype) for x in (q, k, v, beta))
    if g is not None:
        decay = torch.exp(g.to(state.dtype))
        state = state * (decay.unsqueeze(-1) if g.dim() == k.dim() else decay[..., None, None])
    delta = beta.unsqueeze(-1) * (v - torch.einsum("...k,...kv->...v", k, state))  # [..., H, V]
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    return scale * torch.einsum("...k,...kv->...v", q, state), state


@torch.no_grad()
def delta_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, *, scale: float = 1.0
               ) -> Tensor:
    """One decoding step that updates `state` [B, H, K, V] in place: q, k [B, H, K]; v [B, H, V]; g [B, H] or
    [B, H, K] or None; beta [B, H]. Returns o [B, H, V] in v's dtype."""
    if g is not None:
        decay = torch.exp(g.to(state.dtype))
        state.mul_(decay.unsqueeze(-1) if g.dim() == 3 else decay[..., None, None])
    k32 = k.to(state.dtype)
    delta = beta.to(state.dtype).unsqueeze(-1) * (v.to(state.dtype) - torch.einsum("bhk,bhkv->bhv", k32, state))
    state.add_(k32.unsqueeze(-1) * delta.unsqueeze(-2))
    return (scale * torch.einsum("bhk,bhkv->bhv", q.to(state.dtype), state)).to(v.dtype)
