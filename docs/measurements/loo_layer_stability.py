"""Rank stability of whole-layer leave-one-out (`by: loo-layer`) on SmolLM2-135M: two held-out sets drawn with seeds 0
and 1 from disjoint halves of the builtin corpus (4 batches of 2 x 256 tokens each), all 30 layers scored; prints both
rankings, the Spearman correlation and the overlap of the first 8 and 15 layers."""

import glob
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lctk.tasks.corpus import builtin_documents
from lctk.distill.convert import student_from_teacher
from lctk.distill.importance import layer_removed, leave_one_out, ranking

LAYERS, LENGTH, BATCHES = 30, 256, 4
torch.set_num_threads(1)
folder = glob.glob(str(Path.home() / ".cache/lctk/teachers/*/"))[0]
tokenizer = AutoTokenizer.from_pretrained(folder)
teacher = student_from_teacher(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)).requires_grad_(False)
documents = builtin_documents()
order = list(range(len(documents)))
random.Random(1234).shuffle(order)
halves = {0: order[: len(order) // 2], 1: order[len(order) // 2 :]}


def held_out(seed: int) -> list[dict]:
    pool = list(halves[seed])
    random.Random(seed).shuffle(pool)
    rows = [ids[:LENGTH] for ids in (tokenizer(documents[d])["input_ids"] for d in pool) if len(ids) >= LENGTH]
    rows = torch.tensor(rows[: 2 * BATCHES])
    return [{"input_ids": rows[i : i + 2], "labels": rows[i : i + 2]} for i in range(0, len(rows), 2)]


rankings = {}
for seed in (0, 1):
    scores = leave_one_out(teacher, teacher, held_out(seed), list(range(LAYERS)), remove=layer_removed)
    rankings[seed] = ranking(scores)
    print(f"seed {seed}: ranking {rankings[seed]}")
    print("  scores", {layer: round(score["score"], 3) for layer, score in scores.items()})
position = [{layer: i for i, layer in enumerate(rankings[seed])} for seed in (0, 1)]
squares = sum((position[0][layer] - position[1][layer]) ** 2 for layer in range(LAYERS))
print(f"spearman {1 - 6 * squares / (LAYERS * (LAYERS**2 - 1)):.3f}, first 8 shared "
      f"{len(set(rankings[0][:8]) & set(rankings[1][:8]))}/8, first 15 shared {len(set(rankings[0][:15]) & set(rankings[1][:15]))}/15")
