"""The chunked SSD op: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t (see reference.py)."""

from __future__ import annotations

from torch import Tensor

from .reference import ssd_chunked, ssd_step

__all__ = ["ssd", "ssd_step"]


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
    """q, k [B, T, Hk, K]; v [B, T, H, V]; g [B, T, H] log-decay or None; initial_state [N, H, K, V]
    (N = B, or the number of sequences with cu_seqlens, which needs B == 1). Returns (o [B, T, H, V], final state)."""
    return ssd_chunked(
        q, k, v, g,
        scale=1.0 if scale is None else scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
