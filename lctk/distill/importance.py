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

Both rank ascending: the first layers of the ranking are replaced first. Ties are broken by layer index, and every
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
