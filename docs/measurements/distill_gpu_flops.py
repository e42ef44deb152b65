"""FLOPs per token of recipes/distill-smollm2-gpu.yaml's steps, for the H100 estimate in its header.

One step of each kind on SmolLM2-135M's shape (random weights, lctk.bench.gpu.SMOLLM2_135M), batch 1 x T tokens on
the CPU, bf16 autocast, counted by torch's FlopCounterMode: the align step (all 30 mixers), the KD step and a plain
next-token step of the student at each stage's layer count (layers spread as the GPU check's distill step spreads
them). FlopCounterMode does not see the CPU's fused SDPA, so the causal attention is added by hand: 2 T d_head H
per token and layer forward (QK^T and PV, each 2 T d H, halved by the mask), three times that forward + backward.
Prints GFLOP per token and the recipe's total for its align and stage tokens.

    PYTHONPATH=$PWD python docs/measurements/distill_gpu_flops.py [T]
"""

from __future__ import annotations

import sys

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from lctk.bench.gpu import DISTILL_RECIPE, SMOLLM2_135M, distill_plan, spread
from lctk.distill.align import AlignedMixers
from lctk.distill.convert import replace_layers, student_from_teacher
from lctk.distill.losses import distill_loss_fn, model_inputs
from lctk.train.losses import LMHead, cross_entropy_sum, final_hidden


def counted(loss_of, length: int) -> float:
    """FLOPs per token of loss_of() and its backward."""
    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        loss_of().backward()
    return counter.get_total_flops() / length


def main(length: int) -> None:
    torch.manual_seed(0)
    layers = SMOLLM2_135M["num_hidden_layers"]
    plan = distill_plan(yaml.safe_load(DISTILL_RECIPE.read_text()), layers)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    teacher = student_from_teacher(hf).requires_grad_(False)
    base = student_from_teacher(hf)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, length))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(length)[None]}
    attention = 2 * length * SMOLLM2_135M["head_dim"] * SMOLLM2_135M["num_attention_heads"]  # one layer, forward

    aligned = AlignedMixers.of(replace_layers(base, list(range(layers)), plan["mixer"], plan["init"]))
    align = counted(lambda: aligned(teacher, batch, plan["align_loss"]), length) + layers * attention
    print(f"T = {length}: align {align / 1e9:.3f} GFLOP/token")
    total = align * plan["align_steps"] * plan["tokens_per_step"]
    for count, steps in zip(plan["replaced"], plan["stage_steps"]):
        chosen = spread(count, layers)
        student = replace_layers(base, chosen, plan["mixer"], plan["init"]).requires_grad_(False)
        for layer in chosen:
            student.model.layers[layer].mixer.requires_grad_(True)
        kd_loss = distill_loss_fn(teacher, plan["loss"], chosen)
        left = layers - count  # attention layers the student still runs, forward and backward
        kd = counted(lambda loss=kd_loss, model=student: loss(model, batch), length) + (layers + 3 * left) * attention

        def plain(model=student):
            hidden, _ = final_hidden(model, model_inputs(batch))
            return cross_entropy_sum(hidden, LMHead.of(model), batch["labels"])

        plain_flops = counted(plain, length) + 3 * left * attention
        print(f"{count} of {layers} replaced: KD {kd / 1e9:.3f}, plain student step {plain_flops / 1e9:.3f} "
              f"GFLOP/token (KD / plain {kd / plain_flops:.2f})")
        total += kd * steps * plan["tokens_per_step"]
    print(f"recipe: {plan['tokens'] / 1e6:.2f}M tokens, {total / 1e15:.2f} PFLOP; at 989 bf16 TFLOP/s (H100 SXM): "
          + ", ".join(f"{total / (mfu * 989e12):.0f} s at {mfu:.0%}" for mfu in (0.05, 0.15, 0.3)))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048)
