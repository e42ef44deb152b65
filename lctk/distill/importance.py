"""Which attention layer to replace next.

leave-one-out (`loo`): the attention branch of layer l is removed (the block keeps its residual and MLP:
h = h + 0, then the MLP) and the rise of the held-out divergence to the teacher over the current student is the
layer's score: rise_l = D(student without l) - D(student). Low rise = the network barely needs the layer.

MMR probes (`mmr`, Apriel-H1's "Mamba-replacement" ranking): layer l is converted to the student mixer, the copy is
distilled for `probe_steps` steps (only the new mixer trains), and the held-out divergence it reaches is the score.
Low = the layer is easy to replace.

whole-layer leave-one-out (`loo-layer`, Apriel-H1's importance): decoder layer l of the teacher becomes the
identity (h -> h, mixer and MLP both skipped) and the held-out divergence from the teacher is the layer's score,
ranked once on the teacher, so every stage continues the same ranking. Use more held-out batches than for `loo`
(distill.importance_batches): the scores of the least important layers are close together.

KL-guided restoring (`kl-restore`, "KL-guided layer selection" for GDN/GLA hybrids of Qwen2.5 and Llama-3.2): start
from the all-converted student (every attention layer left is run by its aligned mixer, lctk.distill.align; the layers
already replaced keep their trained mixers), put back one attention layer at a time, and score each layer by the KL
it removes: score_l = D(all converted) - D(all converted but l). Low = restoring the layer buys little: replaced
first. Nothing is copied: forward hooks swap each attention's output for its aligned mixer's. Each probe is one
student forward over the `distill.importance_batches` held-out batches (batch_size x seq_len tokens each), and the
teacher runs once per batch for all of them: candidates + 1 student forwards in all, no training. Measured on
SmolLM2-135M after 20 align steps (BENCHMARKS.md, issue 29) it chose worse layers than `loo` for 8 of 30: the
all-converted student was 12 nats from the teacher, where restoring one layer is a noisy change; the paper restores
a few layers into an all-linear student distilled end to end first.

MMR from the aligned mixers (`mmr_aligned`, for the agreement report only): Apriel-H1's MMR probe with the align stage
standing in for the probe's training: layer l alone is run by its aligned mixer (the others keep what they have) and
the held-out divergence to the teacher is the score; it equals `mmr` with zero probe steps after the align stage
(tested). Cost: one probe pass, as `loo`: one student forward per candidate over the `distill.importance_batches`
held-out batches, the teacher once per batch; `mmr` itself trains `probe_steps` KD steps per candidate on top (100
in Apriel-H1: 100 x candidates training steps, far more than every other rule together).

`rank_agreement` compares two rankings of the same layers: Spearman's rho and the share of the first `kept` (the
layers a stage replaces) that both choose. A distill run reports, for each stage ranked by a rule, the agreement of
its ranking with `mmr_aligned` (one extra probe pass; needs the align stage), and for `kl-restore` also with `loo` and
`loo-layer` (two more passes): stage-K/importance.json, `agreement`.

All rank ascending: the first layers of the ranking are replaced first. Ties are broken by layer index, and every
score is a deterministic function of the model, the held-out rows and the seed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from lctk.distill.losses import kd_loss_sum, model_inputs, target_mask
from lctk.train.losses import LMHead, final_hidden


@contextlib.contextmanager
def attention_removed(model, layer: int) -> Iterator[None]:
    """Within the block, layer `layer`'s mixer adds nothing to the residual stream."""
    handle = model.model.layers[layer].mixer.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def layer_removed(model, layer: int) -> Iterator[None]:
    """Decoder layer `layer` returns its input: the whole block (mixer and MLP) is the identity."""
    handle = model.model.layers[layer].register_forward_hook(lambda module, args, out: args[0])
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def divergence(student, teacher, batches: Sequence[dict], kind: str = "reverse_kl") -> float:
    """Mean per-position divergence to the teacher over the counted positions of `batches`."""
    return _divergences(student, teacher, batches, [None], kind)[None]


@torch.no_grad()
def leave_one_out(student, teacher, batches: Sequence[dict], candidates: Sequence[int],
                  kind: str = "reverse_kl", remove=attention_removed) -> dict[int, dict[str, float]]:
    """{layer: {"score": rise, "divergence": D without the layer}} for each candidate attention layer; `remove`:
    attention_removed (the mixer's branch) or layer_removed (the whole decoder layer)."""
    found = _divergences(student, teacher, batches, [None, *candidates], kind, remove)
    return {layer: {"score": found[layer] - found[None], "divergence": found[layer]} for layer in candidates}


def _divergences(student, teacher, batches: Sequence[dict], removed: Sequence[int | None], kind: str,
                 remove=attention_removed) -> dict:
    """{layer or None: mean divergence with that layer's attention removed (None: nothing removed)}; the teacher
    runs once per batch."""
    was_training = student.training
    student.eval()
    totals, count = dict.fromkeys(removed, 0.0), 0.0
    student_head, teacher_head = LMHead.of(student), LMHead.of(teacher)
    for batch in batches:
        inputs = model_inputs(batch)
        reference, _ = final_hidden(teacher, inputs)
        for layer in removed:
            with contextlib.nullcontext() if layer is None else remove(student, layer):
                hidden, _ = final_hidden(student, inputs)
            totals[layer] += float(kd_loss_sum(hidden, student_head, reference, teacher_head, batch["labels"], kind))
        count += float(target_mask(batch).sum())
    student.train(was_training)
    return {layer: total / max(count, 1.0) for layer, total in totals.items()}


@contextlib.contextmanager
def run_by(model, mixers: dict[int, Callable]) -> Iterator[None]:
    """Within, the mixer of each layer in `mixers` hands its input to that callable and its output is what the
    callable returns (an aligned mixer standing in for an attention layer)."""
    handles = [model.model.layers[layer].mixer.register_forward_hook(
        lambda module, args, out, run=run: run(args[0], args[1], None)) for layer, run in mixers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def kl_restore(student, teacher, batches: Sequence[dict], candidates: Sequence[int], aligned,
               kind: str = "reverse_kl") -> dict[int, dict[str, float]]:
    """{layer: {"score": KL removed by restoring the layer's attention, "divergence": D with it restored}} for each
    candidate attention layer of `student`, from the student with every candidate run by its `aligned` mixer
    (an AlignedMixers); the all-converted divergence is under key "all_converted" of each entry."""
    stand_ins = {layer: aligned.mixers[str(layer)] for layer in candidates}

    def restored(model, layer):
        return run_by(model, {other: mixer for other, mixer in stand_ins.items() if other != layer})

    with run_by(student, stand_ins):
        converted = _divergences(student, teacher, batches, [None], kind)[None]
    found = _divergences(student, teacher, batches, candidates, kind, restored)
    return {layer: {"score": converted - found[layer], "divergence": found[layer], "all_converted": converted}
            for layer in candidates}


@torch.no_grad()
def mmr_aligned(student, teacher, batches: Sequence[dict], candidates: Sequence[int], aligned,
                kind: str = "reverse_kl") -> dict[int, dict[str, float]]:
    """{layer: {"score": D with only that layer's attention run by its `aligned` mixer}} for each candidate of
    `student` (an AlignedMixers, or anything with .mixers[str(layer)]): MMR probes at zero steps, by forward hooks."""
    stand_ins = {layer: aligned.mixers[str(layer)] for layer in candidates}
    found = _divergences(student, teacher, batches, candidates, kind,
                         lambda model, layer: run_by(model, {layer: stand_ins[layer]}))
    return {layer: {"score": found[layer]} for layer in candidates}


def rank_agreement(first: Sequence[int], second: Sequence[int], kept: int) -> dict[str, float]:
    """Spearman's rho of two rankings of the same layers and the share of the first `kept` of each that agree."""
    if sorted(first) != sorted(second):
        raise ValueError(f"rankings of different layers: {sorted(first)} vs {sorted(second)}")
    count = len(first)
    position = {layer: rank for rank, layer in enumerate(second)}
    squared = sum((rank - position[layer]) ** 2 for rank, layer in enumerate(first))
    rho = 1 - 6 * squared / (count * (count**2 - 1)) if count > 1 else 1.0
    return {"spearman": rho, "kept_overlap": len(set(first[:kept]) & set(second[:kept])) / max(kept, 1)}


def mmr_probes(teacher, batches: Sequence[dict], candidates: Sequence[int], probe: Callable[[int], object],
               kind: str = "reverse_kl") -> dict[int, dict[str, float]]:
    """{layer: {"score": held-out divergence after the probe}}; `probe(layer)` returns the probed student (layer
    converted and briefly distilled)."""
    scores = {}
    for layer in candidates:
        probed = probe(layer)
        scores[layer] = {"score": divergence(probed, teacher, batches, kind)}
        del probed
    return scores


def ranking(scores: dict[int, dict[str, float]]) -> list[int]:
    """Layers from the first to replace (lowest score) to the last."""
    return sorted(scores, key=lambda layer: (scores[layer]["score"], layer))
