"""The chunked gated delta rule: S_t = (I - b_t k_t k_t^T) D_t S_{t-1} + b_t k_t v_t^T, o_t = scale * q_t^T S_t, with a
scalar (Gated DeltaNet) or per-channel (Kimi Delta Attention) decay D_t = diag(exp(g_t)) (equations in reference.py).

Dispatch as `lctk.kernels.ssd`: CUDA tensors run the Triton kernels (triton.py), CPU tensors the torch chunked form
(reference.py, also the CPU training path); LCTK_KERNELS=torch|triton forces one, and `triton` on CPU tensors needs
TRITON_INTERPRET=1 (how the tests check the kernels on a CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ssd import backend_for
from .reference import delta_chunked, delta_recurrent
from .reference import delta_step as _delta_step_reference

__all__ = ["delta_recurrent", "delta_rule", "delta_step"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_KEY_DIM = 256  # the Triton state kernels hold a whole [K, BV] state tile


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H] (scalar log-decay per head), [B, T, H, K] (per channel) or None
    (no decay), all <= 0; beta [B, T, H] write strengths; initial_state [N, H, K, V] (N = B, or the number of
    sequences with cu_seqlens, which needs B == 1); scale defaults to 1. chunk_size is the torch path's chunk length;
    the Triton path rounds it to a power of two in [16, 64] (the result does not depend on it).
    Returns (o [B, T, H, V] in v's dtype, the final states [N, H, K, V] fp32 when output_final_state else None)."""
    _check(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size)
    kwargs = dict(
        scale=1.0 if scale is None else float(scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
    if backend_for(q) == "triton":
        if q.dtype not in _TRITON_DTYPES:
            raise ValueError(f"delta_rule: the Triton path takes float32, bfloat16 or float16, got {q.dtype}")
        if q.shape[-1] > TRITON_MAX_KEY_DIM:
            raise ValueError(f"delta_rule: the Triton path takes K <= {TRITON_MAX_KEY_DIM}, got {q.shape[-1]}")
        from .triton import delta_triton

        return delta_triton(q, k, v, g, beta, **kwargs)
    return delta_chunked(q, k, v, g, beta, **kwargs)


def delta_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor, state: Tensor, *, scale: float = 1.0
) -> Tensor:
    """One decoding step on `state` [B, H, K, V] (fp32), updated in place: q, k [B, H, K]; v [B, H, V]; g [B, H],
    [B, H, K] or None; beta [B, H]. Returns o [B, H, V] in v's dtype."""
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"delta_step: q and k must both be [B, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, key_dim = q.shape
    if v.dim() != 3 or v.shape[:2] != (batch, heads):
        raise ValueError(f"delta_step: v must be [B={batch}, H={heads}, V], got {tuple(v.shape)}")
    if g is not None and g.shape not in ((batch, heads), (batch, heads, key_dim)):
        raise ValueError(f"delta_step: g must be [B, H] or [B, H, K] = {(batch, heads, key_dim)}, got {tuple(g.shape)}")
    if beta.shape != (batch, heads):
        raise ValueError(f"delta_step: beta must be [B, H] = {(batch, heads)}, got {tuple(beta.shape)}")
    if state.shape != (batch, heads, key_dim, v.shape[-1]):
        raise ValueError(
            f"delta_step: state must be [B, H, K, V] = {(batch, heads, key_dim, v.shape[-1])}, got {tuple(state.shape)}"
        )
    _check_devices(q, k=k, v=v, g=g, beta=beta, state=state)
    return _delta_step_reference(q, k, v, g, beta, state, scale=scale)


def _check(q, k, v, g, beta, initial_state, cu_seqlens, chunk_size) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"delta_rule: q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq_len, heads, key_dim = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"delta_rule: v must be [B={batch}, T={seq_len}, H={heads}, V], got {tuple(v.shape)}")
    value_dim = v.shape[3]
    if seq_len == 0:
        raise ValueError("delta_rule: the sequence is empty (T = 0)")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"delta_rule: q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g is not None and (g.shape not in ((batch, seq_len, heads), q.shape) or not g.is_floating_point()):
        raise ValueError(
            f"delta_rule: g must be a float [B, T, H] or [B, T, H, K] = {tuple(q.shape)}, got {tuple(g.shape)} {g.dtype}"
        )
    if beta.shape != (batch, seq_len, heads) or not beta.is_floating_point():
        raise ValueError(f"delta_rule: beta must be a float [B, T, H] = {(batch, seq_len, heads)}, got {tuple(beta.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"delta_rule: chunk_size must be a positive int, got {chunk_size!r}")
    n_seqs = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"delta_rule: cu_seqlens needs a batch of one row (the sequences end to end), got B={batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or len(cu_seqlens) < 2:
            raise ValueError(
                f"delta_rule: cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got {tuple(cu_seqlens.shape)} "
                f"{cu_seqlens.dtype}"
            )
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != seq_len or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"delta_rule: cu_seqlens must rise from 0 to T={seq_len}, got {offsets}")
        n_seqs = len(offsets) - 1
    if initial_state is not None and initial_state.shape != (n_seqs, heads, key_dim, value_dim):
        raise ValueError(
            f"delta_rule: initial_state must be [N, H, K, V] = {(n_seqs, heads, key_dim, value_dim)}, "
            f"got {tuple(initial_state.shape)}"
        )
    _check_devices(q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens)


def _check_devices(q: Tensor, **others: Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"delta_rule: {name} is on {x.device} but q is on {q.device}")
