"""Time cost of train.recompute_segment: one training step (forward + backward, chunked loss, per-block activation
checkpointing, bf16 autocast, one thread) of the memory benchmark's 4-layer MMMA hybrid at T = 4096, with and
without segments of 1,024 tokens, the same weights, alternated for 3 rounds; prints each time and the ratio of the
fastest. Usage: python docs/measurements/segment_recompute_time.py"""

import time

import torch

from lctk.bench.memory import VOCAB, build
from lctk.train.trainer import causal_lm_loss

LENGTH, SEGMENT, ROUNDS = 4096, 1024, 3
torch.set_num_threads(1)
models = {}
for segment in (None, SEGMENT):
    torch.manual_seed(0)
    model = build("hybrid").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.recompute_in_segments(segment)
    models[segment] = model
ids = torch.randint(0, VOCAB, (1, LENGTH))
batch = {"input_ids": ids, "position_ids": torch.arange(LENGTH)[None], "labels": ids}
times = {segment: [] for segment in models}
for round_ in range(ROUNDS):
    for segment, model in models.items():
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        times[segment].append(time.perf_counter() - started)
        print(f"segments {segment}, round {round_}: {times[segment][-1]:.1f} s, loss {loss.item():.2f}", flush=True)
print(f"segmented / whole, fastest of each: {min(times[SEGMENT]) / min(times[None]):.3f}")
