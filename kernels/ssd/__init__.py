"""The chunked SSD op: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t (equations in reference.py).

Dispatch: CUDA tensors run the Triton kernels (triton.py), CPU tensors the torch reference (reference.py, also the
CPU training path). The environment variable LCTK_KERNELS forces one: `torch`, or `triton`, which on CPU tensors
needs TRITON_INTERPRET=1 set before the first Triton call (that is how the tests check the kernels on a CPU). Without
LCTK_KERNELS, TRITON_INTERPRET alone changes nothing: CPU tensors keep the fast torch path.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from .reference import ssd_chunked
from .reference import ssd_step as _ssd_step_reference

__all__ = ["backend_for", "ssd", "ssd_step"]

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ssd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """q, k [B, T, Hk, K]; v [B, T, H, V] (H a multiple of Hk: value head h reads q/k head h // (H // Hk));
    g [B, T, H] log-decay (<= 0) or None for no decay; initial_state [N, H, K, V] (N = B, or the number of sequences
    with cu_seqlens, which needs B == 1); scale defaults to 1. chunk_size is the torch path's chunk length; the
    Triton path rounds it to a power of two in [16, 64] (the result does not depend on it).
    Returns (o [B, T, H, V] in v's dtype, the final states [N, H, K, V] fp32 when output_final_state else None)."""
    _check(q, k, v, g, initial_state, cu_seqlens, chunk_size)
    kwargs = dict(
        scale=1.0 if scale is None else float(scale),
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
    if backend_for(q) == "triton":
        if q.dtype not in _TRITON_DTYPES:
            raise ValueError(f"ssd: the Triton path takes float32, bfloat16 or float16, got {q.dtype}")
        from .triton import ssd_triton

        return ssd_triton(q, k, v, g, **kwargs)
    return ssd_chunked(q, k, v, g, **kwargs)


def ssd_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor, *, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One decoding step: q, k [B, Hk, K]; v [B, H, V]; g [B, H] or None; state [B, H, K, V] (fp32).
    Returns (o [B, H, V] in v's dtype, the new state fp32)."""
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"ssd_step: q and k must both be [B, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, n_groups, key_dim = q.shape
    if v.dim() != 3 or v.shape[0] != batch or v.shape[1] % n_groups:
        raise ValueError(f"ssd_step: v must be [B={batch}, H, V] with H a multiple of Hk={n_groups}, got {tuple(v.shape)}")
    n_heads, value_dim = v.shape[1:]
    if g is not None and g.shape != (batch, n_heads):
        raise ValueError(f"ssd_step: g must be [B, H] = {(batch, n_heads)}, got {tuple(g.shape)}")
    if state.shape != (batch, n_heads, key_dim, value_dim):
        raise ValueError(f"ssd_step: state must be [B, H, K, V] = {(batch, n_heads, key_dim, value_dim)}, got {tuple(state.shape)}")
    _check_devices(q, k=k, v=v, g=g, state=state)
    return _ssd_step_reference(q, k, v, g, state, scale=scale)


def backend_for(x: Tensor) -> str:
    """'triton' or 'torch': the path `ssd` takes for tensors like x (see the module docstring)."""
    forced = os.environ.get("LCTK_KERNELS", "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise ValueError(f"LCTK_KERNELS must be 'torch' or 'triton', got {forced!r}")
    if forced == "triton":
        if not _triton_available():
            raise ValueError("LCTK_KERNELS=triton needs the triton package")
        if not (x.is_cuda or _interpreting()):
            raise ValueError(f"LCTK_KERNELS=triton needs CUDA tensors or TRITON_INTERPRET=1 (tensors are on {x.device.type})")
        return "triton"
    return "triton" if forced != "torch" and x.is_cuda and _triton_available() else "torch"


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check(q, k, v, g, initial_state, cu_seqlens, chunk_size) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"ssd: q and k must both be [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq_len, n_groups, key_dim = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2] or v.shape[2] % n_groups:
        raise ValueError(
            f"ssd: v must be [B={batch}, T={seq_len}, H, V] with H a multiple of Hk={n_groups}, got {tuple(v.shape)}"
        )
    n_heads, value_dim = v.shape[2:]
    if seq_len == 0:
        raise ValueError("ssd: the sequence is empty (T = 0)")
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(f"ssd: q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g is not None and (g.shape != (batch, seq_len, n_heads) or not g.is_floating_point()):
        raise ValueError(f"ssd: g must be a float [B, T, H] = {(batch, seq_len, n_heads)}, got {tuple(g.shape)} {g.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be a positive int, got {chunk_size!r}")
    n_seqs = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"ssd: cu_seqlens needs a batch of one row (the sequences laid end to end), got B={batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64) or len(cu_seqlens) < 2:
            raise ValueError(f"ssd: cu_seqlens must be a 1-D int32/int64 tensor [N + 1], got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != seq_len or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"ssd: cu_seqlens must rise from 0 to T={seq_len}, got {offsets}")
        n_seqs = len(offsets) - 1
    if initial_state is not None and initial_state.shape != (n_seqs, n_heads, key_dim, value_dim):
        raise ValueError(
            f"ssd: initial_state must be [N, H, K, V] = {(n_seqs, n_heads, key_dim, value_dim)}, "
            f"got {tuple(initial_state.shape)}"
        )
    _check_devices(q, k=k, v=v, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens)


def _check_devices(q: Tensor, **others: Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"ssd: {name} is on {x.device} but q is on {q.device}")
