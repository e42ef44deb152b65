"""How fast one decode step's attention reads the KV cache on this CPU, against how fast the machine streams the same
bytes: what bounds issue 28's batch-1 roofline fraction at long context.

SmolLM2-135M's attention (3 key/value heads, 3 query heads per key head, head dim 64), one query token per row, the
caches of 30 layers (so the working set is a real step's, past the caches), fp32, one thread, thread CPU time, best
of 3 passes. Rates are the cache's bytes (keys + values) over the time of:
  stream      K.sum() + V.sum(): a pure read of the same bytes
  gemv        one matrix-vector product over a matrix of the same bytes (the roofline probe's kernel)
  sdpa        scaled_dot_product_attention with a key head's 3 query heads as 3 query rows (lctk's decode path)
  sdpa-gqa    9 query heads of 1 row, enable_gqa (transformers' Llama path)
  scores      q @ K^T alone (3 rows: a GEMM with 3 output rows); values: softmax(s) @ V alone

    PYTHONPATH=$PWD python docs/measurements/decode_attention_bandwidth.py [contexts, default 2048,8192,32768] [batch]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

LAYERS, KV_HEADS, GROUP, HEAD_DIM = 30, 3, 3, 64


def best_seconds(fn, passes: int = 3) -> float:
    fn()
    times = []
    for _ in range(passes):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times)


def rates(context: int, batch: int) -> dict[str, float]:
    shape = (batch, KV_HEADS, context, HEAD_DIM)
    keys = [torch.randn(shape) for _ in range(LAYERS)]
    values = [torch.randn(shape) for _ in range(LAYERS)]
    grouped = torch.randn(batch, KV_HEADS, GROUP, HEAD_DIM)
    flat = grouped.reshape(batch, KV_HEADS * GROUP, 1, HEAD_DIM)
    probs = torch.softmax(torch.randn(batch, KV_HEADS, GROUP, context), -1)
    pairs = list(zip(keys, values))
    matrix = torch.randn(2 * LAYERS * batch * KV_HEADS * context, HEAD_DIM).view(-1, 4096)
    vector = torch.randn(4096)
    cache_bytes = 2 * LAYERS * keys[0].numel() * 4
    kernels = {
        "stream": lambda: [(k.sum(), v.sum()) for k, v in pairs],
        "gemv": lambda: matrix @ vector,
        "sdpa": lambda: [F.scaled_dot_product_attention(grouped, k, v) for k, v in pairs],
        "sdpa-gqa": lambda: [F.scaled_dot_product_attention(flat, k, v, enable_gqa=True) for k, v in pairs],
        "scores": lambda: [grouped @ k.transpose(-1, -2) for k in keys],
        "values": lambda: [probs @ v for v in values],
    }
    half = {"scores", "values"}  # each reads one of the two caches
    return {name: cache_bytes / (2 if name in half else 1) / best_seconds(fn) / 1e9 for name, fn in kernels.items()}


def main() -> None:
    torch.set_num_threads(1)
    contexts = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "2048,8192,32768").split(",")]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(f"GB/s, batch {batch}, {LAYERS} layers' caches, fp32, 1 thread")
    print(f"{'context':>8} {'cache MB':>9} " + " ".join(f"{n:>9}" for n in ("stream", "gemv", "sdpa", "sdpa-gqa",
                                                                            "scores", "values")))
    for context in contexts:
        measured = rates(context, batch)
        cache_mb = 2 * LAYERS * batch * KV_HEADS * context * HEAD_DIM * 4 / 1e6
        print(f"{context:>8} {cache_mb:>9.0f} " + " ".join(f"{v:>9.2f}" for v in measured.values()), flush=True)


if __name__ == "__main__":
    main()
