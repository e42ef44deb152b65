"""What the align stage keeps for backward at once, against the number of layers it aligns: gradients taken layer by
layer inside the teacher's forward (one process, DDP) against one graph and one backward (the FSDP path).

Counted: the bytes of every tensor autograd saves for backward that is not a parameter's storage, at the moment the
most of them are alive (saved_tensors_hooks), for one align step of a Llama (hidden 256, 4 heads, 2 kv heads, MLP 512)
with every layer converted to Mamba-2, one row of T tokens, fp32. The layer-by-layer path also holds each mixer's
gradient until the Trainer's backward (part of the count: it is the mixers' own size).

    PYTHONPATH=$PWD python docs/measurements/align_memory.py [T]
"""

from __future__ import annotations

import sys
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.distill.align import AlignedMixers, align_loss_fn
from lctk.distill.convert import replace_layers, student_from_teacher


def saved_peak(layers: int, length: int, eager: bool) -> tuple[int, int]:
    """(peak bytes saved for backward, bytes of the aligned mixers' parameters)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=length)
    teacher = student_from_teacher(LlamaForCausalLM(config)).requires_grad_(False)
    aligned = AlignedMixers.of(replace_layers(teacher, list(range(layers)), "mamba2", "mil"))
    weights = {p.untyped_storage().data_ptr() for p in aligned.parameters()}
    ids = torch.randint(0, 1000, (1, length))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(length)[None]}
    live, peak = [0], [0]

    class Held:
        def __init__(self, tensor):
            self.tensor = tensor
            own = tensor.untyped_storage().data_ptr() not in weights
            self.size = tensor.numel() * tensor.element_size() if own else 0
            live[0] += self.size
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.size

    with mock.patch("lctk.parallel.fsdp.is_sharded", lambda module: not eager), \
            torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
        loss = align_loss_fn(teacher)(aligned, batch)
    loss.backward()
    return peak[0], sum(p.numel() * p.element_size() for p in aligned.parameters())


def main() -> None:
    length = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    print(f"T = {length}; MiB saved for backward at the peak (the mixers' parameters alongside)")
    print("| layers | layer by layer | one graph (FSDP path) | mixer parameters |")
    print("|---|---|---|---|")
    for layers in (2, 4, 8, 16):
        eager, params = saved_peak(layers, length, eager=True)
        whole, _ = saved_peak(layers, length, eager=False)
        print(f"| {layers} | {eager / 2**20:.1f} | {whole / 2**20:.1f} | {params / 2**20:.1f} |", flush=True)


if __name__ == "__main__":
    main()
