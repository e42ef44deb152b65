"""The SSD op on this CPU: lctk's chunked torch path vs transformers' Mamba-2 torch fallback vs a naive scan.

Shapes of one Mamba-2 layer with hidden 256 (d_inner 512 = 8 heads of dim 64, state 64, one group), batch 1,
fp32. Every method computes y = SSD(q = C, k = B, v = x * dt, g = A * dt) from (x, dt, A, B, C) and the
gradients of x, dt, B and C. transformers' fallback is `mamba2_chunk_scan` (what Mamba2Mixer runs without
mamba_ssm), at lctk's chunk of 64 and at Mamba2Config's default of 256. The naive scan runs the recurrence token
by token (autograd through every step), so it is compared at a short length only.
Time: best of a few interleaved runs, wall clock and CPU time of this process (all threads; the steadier figure
on a shared machine). Memory: the peak of live torch tensors during one forward+backward, tracked op by op
(inputs excluded).
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lctk.kernels.ssd import ssd

HEADS, HEAD_DIM, STATE = 8, 64, 64
LENGTHS = (2048, 8192)
NAIVE_LENGTH = 512
REPEATS = 3


def _inputs(seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(1, seq_len, HEADS, HEAD_DIM, generator=gen).requires_grad_(),
        dt=(0.1 * torch.rand(1, seq_len, HEADS, generator=gen)).requires_grad_(),
        A=-(0.5 + torch.rand(HEADS, generator=gen)),
        B=torch.randn(1, seq_len, 1, STATE, generator=gen).requires_grad_(),
        C=torch.randn(1, seq_len, 1, STATE, generator=gen).requires_grad_(),
    )


def lctk_chunked(x, dt, A, B, C):
    return ssd(C, B, x * dt.unsqueeze(-1), A * dt, chunk_size=64)[0]


def naive_scan(x, dt, A, B, C):
    v, g = x * dt.unsqueeze(-1), A * dt  # [1, T, H, P], [1, T, H]
    state = x.new_zeros(1, HEADS, STATE, HEAD_DIM)
    outputs = []
    for t in range(x.shape[1]):
        state = torch.exp(g[:, t, :, None, None]) * state + B[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bn,bhnp->bhp", C[:, t, 0], state))
    return torch.stack(outputs, 1)


def _hf_chunk_scans() -> dict:
    try:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    except ImportError:
        return {}
    scan = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)  # the torch function itself
    return {
        f"transformers fallback (L={chunk})": lambda x, dt, A, B, C, chunk=chunk: scan(x, dt, A, B, C, chunk_size=chunk)
        for chunk in (64, 256)
    }


class _PeakTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storage created inside the block, and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def _forward_backward(fn, inputs: dict) -> None:
    y = fn(**inputs)
    y.backward(torch.ones_like(y))


def _measure(methods: dict, seq_len: int, repeats: int) -> dict[str, dict[str, float]]:
    inputs = _inputs(seq_len)
    results = {name: {"fwd": float("inf"), "fwd_bwd": float("inf"), "fwd_bwd_cpu": float("inf")} for name in methods}
    for name, fn in methods.items():  # warm-up, and the memory peak
        with _PeakTensorMemory() as memory:
            _forward_backward(fn, inputs)
        results[name]["peak_mb"] = memory.peak / 2**20
    for _ in range(repeats):
        for name, fn in methods.items():
            for x in inputs.values():
                x.grad = None
            start = time.perf_counter()
            with torch.no_grad():
                fn(**inputs)
            middle, cpu = time.perf_counter(), time.process_time()
            _forward_backward(fn, inputs)
            r = results[name]
            r["fwd"] = min(r["fwd"], middle - start)
            r["fwd_bwd"] = min(r["fwd_bwd"], time.perf_counter() - middle)
            r["fwd_bwd_cpu"] = min(r["fwd_bwd_cpu"], time.process_time() - cpu)
    return results


def run() -> None:
    print(__doc__.split("\n\n")[0])
    print(f"B=1, H={HEADS} heads of dim {HEAD_DIM}, state {STATE}, 1 group, fp32, torch threads={torch.get_num_threads()}")
    ours = "lctk chunked (L=64)"
    hf = _hf_chunk_scans()
    plan = [(seq_len, {ours: lctk_chunked, **hf}, REPEATS) for seq_len in LENGTHS]
    plan.insert(0, (NAIVE_LENGTH, {ours: lctk_chunked, "naive scan": naive_scan}, 1))
    rows, ratios = [], []
    for seq_len, methods, repeats in plan:
        measured = _measure(methods, seq_len, repeats)
        for name, r in measured.items():
            rows.append(
                f"{name:<31}{seq_len:>6}{1000 * r['fwd']:>10.1f}{1000 * r['fwd_bwd']:>12.1f}"
                f"{1000 * r['fwd_bwd_cpu']:>14.1f}{r['peak_mb']:>10.1f}"
            )
        for other in (n for n in measured if n != ours):
            r, base = measured[other], measured[ours]
            ratios.append(
                f"T={seq_len}: {other} / lctk: fwd {r['fwd'] / base['fwd']:.1f}x, "
                f"fwd+bwd {r['fwd_bwd'] / base['fwd_bwd']:.1f}x (CPU time {r['fwd_bwd_cpu'] / base['fwd_bwd_cpu']:.1f}x), "
                f"peak memory {r['peak_mb'] / base['peak_mb']:.1f}x"
            )
    print(f"{'method':<31}{'T':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'f+b CPU ms':>14}{'peak MB':>10}")
    print("\n".join(rows))
    print("\n".join(ratios))
    if not hf:
        print("transformers' Mamba-2 fallback not found: only lctk and the naive scan were measured")


if __name__ == "__main__":
    run()
