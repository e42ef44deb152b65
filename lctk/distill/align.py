"""The align stage: every attention layer's new mixer learns to reproduce that attention layer's output from the
teacher's own input to it, before any KD stage.

This is RADLADS' step 1 ("attention hidden-state alignment") and LoLCATs' attention transfer: per layer l, with the
teacher frozen and x_l the (normed) input the teacher's attention l receives,

    mse      d_l(t) = mean_d (mixer_l(x_l)_t,d - attention_l(x_l)_t,d)^2          LoLCATs' MSE, RADLADS' L2
    cosine   d_l(t) = 1 - cos(mixer_l(x_l)_t, attention_l(x_l)_t)

and the loss is the mean over the aligned layers of d_l, averaged over the counted positions (the Trainer's targets).
MOHAWK's hidden-state alignment matches whole blocks (the MLP included) instead; with the MLPs frozen and copied from
the teacher, matching the mixer's output is the part that trains, and it keeps the loss free of the MLP's cost.

Every layer learns from the teacher's inputs, not from the student's, so the layers are independent: all of them
are aligned at once, from one teacher forward per batch. lctk aligns every attention layer of the teacher (not only
those the schedule converts): which layers the stages convert is decided later (loo, mmr, kl-restore rank the
aligned mixers), and each stage then starts its new layers from their aligned mixers instead of the bare
initialisation. As in RADLADS and LoLCATs, alignment happens once, before the end-to-end (KD) stages; aligning each
stage's layers at its start would give the same mixers (the targets do not depend on other stages) at more teacher
forwards.

Cost: one teacher forward per batch (no grad) plus each mixer's own forward and backward; no student forward,
nothing through the MLPs or the LM head. Memory: each layer's pair (x_l, attention output) is used inside the
teacher's forward, when the hook on attention l fires, and dropped. On one process or DDP each layer's gradient is
also taken right there (torch.autograd.grad) and carried to the Trainer's backward by a surrogate term sum(p * g),
so the activations of one mixer at a time are alive: memory per process = the teacher's forward + one mixer's
activations + the mixers' weights, gradients and optimizer state, whatever the number of layers. Under FSDP2 (each
mixer its own shard group) the backward must go through the mixers' outputs for the shard groups' hooks to gather and
reduce, so the mixers' graphs are kept until the Trainer's backward (one mixer's activations per aligned layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lctk.distill import convert
from lctk.distill.losses import model_inputs, target_mask
from lctk.models.mixers import MIXERS

LOSSES = ("mse", "cosine")


def output_distance(ours: Tensor, theirs: Tensor, kind: str = "mse") -> Tensor:
    """[B, T]: the distance of each position's mixer output [B, T, D] from the attention's (see the module doc)."""
    ours, theirs = ours.float(), theirs.float()
    if kind == "mse":
        return (ours - theirs).pow(2).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(ours, theirs, dim=-1)
    raise ValueError(f"unknown align loss {kind!r}; known: {', '.join(LOSSES)}")


class AlignedMixers(nn.Module):
    """The new mixers of every converted layer, without the rest of the student: what the align stage trains.
    `config` is the converted student's HybridConfig (rebuilt from it after FSDP)."""

    _no_split_modules = sorted({cls.__name__ for cls in MIXERS.values()})  # FSDP2: one shard group per mixer

    def __init__(self, config, mixers: dict[int, nn.Module] | None = None):
        super().__init__()
        self.config = config
        if mixers is None:
            mixers = {}
            for index, letter in enumerate(config.pattern):
                if letter not in convert.ATTENTION_LETTERS:
                    mixers[index] = MIXERS[letter](config, letter)
                    mixers[index].layer_idx = index
        self.mixers = nn.ModuleDict({str(index): mixers[index] for index in sorted(mixers)})

    @classmethod
    def of(cls, student) -> AlignedMixers:
        """The converted layers' mixers of `student` (the same modules: training them trains the student)."""
        layers = convert.layout(student)["replaced_layers"]
        return cls(student.config, {index: student.model.layers[index].mixer for index in layers})

    @property
    def layers(self) -> list[int]:
        return [int(index) for index in self.mixers]

    def forward(self, teacher, batch: dict, kind: str = "mse") -> Tensor:
        """SUM over counted positions of the mean over layers of d_l, from one forward of `teacher` whose attention
        layers hand their input and output to the mixers as they run."""
        from lctk.parallel.fsdp import is_sharded

        mask = target_mask(batch)
        eager = not is_sharded(self)
        totals, surrogate = [], []

        def compare(index: int):
            mixer = self.mixers[str(index)]

            def hook(module, args, output):
                with torch.enable_grad():
                    loss = (output_distance(mixer(args[0], args[1], None), output, kind) * mask).sum() / len(self.mixers)
                    if not eager:
                        totals.append(loss)
                        return
                    params = [p for p in mixer.parameters() if p.requires_grad]
                    grads = torch.autograd.grad(loss, params, allow_unused=True)  # this layer's graph goes now
                    surrogate.extend((p * g).sum() if g is not None else p.sum() * 0 for p, g in zip(params, grads))
                totals.append(loss.detach())

            return hook

        handles = [teacher.model.layers[index].mixer.register_forward_hook(compare(index)) for index in self.layers]
        try:
            with torch.no_grad():
                teacher.model(**model_inputs(batch), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        total = torch.stack(totals).sum()
        if not surrogate:
            return total
        carried = torch.stack(surrogate).sum()
        return total + carried - carried.detach()  # the value of the loss, the gradients taken per layer above

    def load_into(self, student, layers: Sequence[int]) -> None:
        """Student layers `layers` (already converted to this mixer) take their aligned weights."""
        for index in layers:
            student.model.layers[index].mixer.load_state_dict(self.mixers[str(index)].state_dict())


def choose_targets(errors: dict[str, dict[int, float]], states: dict[str, int],
                   max_state: int | None = None) -> dict[int, str]:
    """{layer: mixer}: per layer, the mixer whose aligned output ends nearest the attention's (`errors`: mixer ->
    layer -> distance after the align stage) among those whose state (`states`: mixer -> elements per layer) fits
    `max_state`; ties go to the earlier mixer of the list."""
    allowed = [name for name in errors if max_state is None or states[name] <= max_state]
    layers = sorted({layer for found in errors.values() for layer in found})
    return {layer: min(allowed, key=lambda name: (errors[name][layer], allowed.index(name))) for layer in layers}


def align_loss_fn(teacher, kind: str = "mse"):
    """A Trainer loss for AlignedMixers (DDP- or FSDP-wrapped or not)."""
    return lambda model, batch: model(teacher, batch, kind)


@torch.no_grad()
def layer_errors(teacher, aligned: AlignedMixers, batches: Sequence[dict], kind: str = "mse") -> dict[int, float]:
    """{layer: mean d_l over the counted positions of `batches`}: how far each mixer is from its attention layer."""
    sums, count = dict.fromkeys(aligned.layers, 0.0), 0.0
    handles = []
    for index in aligned.layers:
        mixer = aligned.mixers[str(index)]

        def hook(module, args, output, index=index, mixer=mixer):
            sums[index] += float((output_distance(mixer(args[0], args[1], None), output, kind) * mask).sum())

        handles.append(teacher.model.layers[index].mixer.register_forward_hook(hook))
    was_training = aligned.training
    aligned.eval()
    try:
        for batch in batches:
            mask = target_mask(batch)
            teacher.model(**model_inputs(batch), use_cache=False)
            count += float(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        aligned.train(was_training)
    return {index: total / max(count, 1.0) for index, total in sums.items()}
