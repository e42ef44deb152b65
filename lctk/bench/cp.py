"""Context parallelism: per-rank peak memory, step time and bytes sent of one training step, against T and N.

    python -m lctk.bench cp

The model: pattern MMASBC (Mamba-2, global attention, sliding window 512, BASED with feature_dim 8, BaseConv),
width 128, 4 heads, vocabulary 4096, fp32, one row of T tokens (width 128 keeps one process at 64K tokens within the
shared box's memory and time). For each T in LENGTHS and N in PROCESSES, N fresh processes (gloo, one thread each)
split the row (lctk.parallel.context) and run one training step: forward, chunked loss, backward, AdamW.
Each rank reports its peak RSS minus its RSS before the model was built (so weights, gradients and AdamW state are
in, a constant of a few tens of MB), the step's wall time, and what lctk.parallel.context counted as sent (forward
and backward) per layer type. The table shows the largest rank's figures. On a 2-core box, 4 processes share 2
cores: their times show contention, not speed-up; memory and bytes are what the layout decides.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

PATTERN = "MMASBC"
WIDTH, HEADS, VOCAB = 128, 4, 4096
LENGTHS = (16384, 32768, 65536)
PROCESSES = (1, 2, 4)
TAGS = {  # tag counted by lctk.parallel.context -> layer letter
    "A kv": "A", "S kv": "S", "M state": "M", "M conv": "M", "B state": "B", "C conv": "C",
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world: int, length: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from lctk.models import HybridConfig, HybridForCausalLM
    from lctk.parallel.context import BYTES_SENT, ContextGroup, shard_batch
    from lctk.train.trainer import causal_lm_loss

    dist.init_process_group("gloo", rank=rank, world_size=world)
    context = ContextGroup(world, rank, dist.new_group(list(range(world))) if world > 1 else None, 0, 1)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, length))
    batch = {"input_ids": ids, "position_ids": torch.arange(length)[None], "labels": ids}
    before = _rss_bytes()
    config = HybridConfig(pattern=PATTERN, vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=HEADS,
                          attention={"window": 512}, based={"feature_dim": 8})
    model = HybridForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = shard_batch(batch, context) if world > 1 else batch
    dist.barrier()
    started = time.perf_counter()
    causal_lm_loss(model, step).backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"rank-{rank}.json").write_text(json.dumps(
        {"peak": peak - before, "seconds": seconds, "sent": dict(BYTES_SENT)}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(length: int, world: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, length, _free_port(), out), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank-{r}.json").read_text()) for r in range(world)]
    per_layer = {}
    for tag, letter in TAGS.items():
        sent = max(rank["sent"].get(tag, 0) for rank in ranks)
        per_layer[letter] = per_layer.get(letter, 0) + sent / PATTERN.count(letter)
    return {"peak": max(r["peak"] for r in ranks), "seconds": max(r["seconds"] for r in ranks), "sent": per_layer}


def run() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"one training step (fwd + chunked loss + bwd + AdamW), pattern {PATTERN}, width {WIDTH}, vocab {VOCAB}, "
          "fp32, batch 1; N processes (gloo, 1 thread each) split the row; largest rank's figures")
    letters = list(dict.fromkeys(PATTERN))
    print(f"{'T':>6} {'N':>2} {'peak MiB':>9} {'x N / 1 proc':>12} {'step s':>7}  "
          + "  ".join(f"{letter + ' KiB/layer':>13}" for letter in letters))
    for length in LENGTHS:
        single = None
        for world in PROCESSES:
            result = measure(length, world)
            single = single or result["peak"]
            ratio = world * result["peak"] / single
            sent = "  ".join(f"{result['sent'].get(letter, 0) / 1024:>13.1f}" for letter in letters)
            print(f"{length:>6} {world:>2} {result['peak'] / 2**20:>9.0f} {ratio:>12.2f} {result['seconds']:>7.1f}  {sent}",
                  flush=True)


if __name__ == "__main__":
    run()
