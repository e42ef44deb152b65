"""Distillation losses, per position; a position t counts when token t+1 is a training target (labels[t+1] != IGNORE,
the Trainer's target count), so a document's last token, which would predict the next document, never counts.

With student distribution q = softmax(s / T) and teacher distribution p = softmax(t / T) over the vocabulary:

    reverse KL   KL(q || p) = sum_v q_v (log q_v - log p_v)     mode-seeking; the default (Apriel-H1, MiniLLM)
    forward KL   KL(p || q) = sum_v p_v (log p_v - log q_v)     mean-seeking (Hinton et al.)
    mix          w KL(p || q) + (1 - w) KL(q || p)

each multiplied by T^2 so that gradient sizes do not shrink with the temperature (Hinton et al. 2015). Optional
terms: `ce_weight` x next-token cross-entropy on the data, and `hidden_weight` x the hidden-state alignment

    align_t = mean over replaced layers l of  ||h_l,t^student - h_l,t^teacher||^2 / ||h_l,t^teacher||^2

with h_l the residual stream after block l (MOHAWK's hidden-state alignment, relative so that it is scale-free).
The align stage before the KD stages (each new mixer against its attention layer's output) is lctk.distill.align.

The vocabulary terms are computed chunk by chunk from the final hidden states of both models and their LM heads
(lctk.train.losses.head_loss): the teacher's logits for a chunk of positions are made, without grad, next to the
student's, and no [T, vocab] tensor exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lctk.labels import IGNORE, shifted_targets
from lctk.train.losses import LMHead, final_hidden, head_loss, token_ce

KINDS = ("reverse_kl", "forward_kl", "mix")
MODEL_INPUTS = ("input_ids", "position_ids")


def token_kl(student_logits: Tensor, teacher_logits: Tensor, kind: str = "reverse_kl", temperature: float = 1.0,
             forward_weight: float = 0.5) -> Tensor:
    """Per-position divergence over the last (vocabulary) dim, in fp32, times T^2."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "reverse_kl":
        kl = _kl(log_q, log_p)
    elif kind == "forward_kl":
        kl = _kl(log_p, log_q)
    elif kind == "mix":
        kl = forward_weight * _kl(log_p, log_q) + (1 - forward_weight) * _kl(log_q, log_p)
    else:
        raise ValueError(f"unknown divergence {kind!r}; known: {', '.join(KINDS)}")
    return kl * temperature**2


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum a (log a - log b) over the last dim."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def target_mask(batch: dict) -> Tensor:
    """[B, T] bool: position t counts when labels[t+1] is a target; the last position never does."""
    return shifted_targets(batch["labels"]) != IGNORE


def model_inputs(batch: dict) -> dict:
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def token_alignment(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor], layers: Sequence[int]) -> Tensor:
    """[B, T]: mean over `layers` of the relative squared error of the residual stream after each block
    (hidden_states index l + 1; index 0 is the embedding output)."""
    terms = []
    for layer in layers:
        ours, theirs = student_hidden[layer + 1].float(), teacher_hidden[layer + 1].float()
        terms.append((ours - theirs).pow(2).sum(-1) / theirs.pow(2).sum(-1).clamp(min=1e-6))
    return torch.stack(terms).mean(0)


def kd_loss_sum(student_hidden: Tensor, student_head: LMHead, teacher_hidden: Tensor, teacher_head: LMHead,
                labels: Tensor, kind: str = "reverse_kl", temperature: float = 1.0, forward_weight: float = 0.5,
                ce_weight: float = 0.0) -> Tensor:
    """SUM over counted positions of token_kl (+ ce_weight x next-token cross-entropy), from final hidden states
    [B, T, D] chunk by chunk; gradients reach the student only."""
    targets = shifted_targets(labels).flatten()
    teacher_flat = teacher_hidden.detach().flatten(0, -2)

    def chunk_loss(logits: Tensor, rows: slice) -> Tensor:
        with torch.no_grad():
            theirs = teacher_head.logits(teacher_flat[rows])
        per_position = token_kl(logits, theirs, kind, temperature, forward_weight)
        if ce_weight > 0:
            per_position = per_position + ce_weight * token_ce(logits, targets[rows])
        return (per_position * (targets[rows] != IGNORE)).sum()

    return head_loss(student_hidden, student_head, chunk_loss)


def distill_loss_fn(teacher, settings, replaced: Sequence[int]):
    """A Trainer loss: (student, batch) -> SUM over counted positions of the per-position loss. `settings` is a
    LossSection; `replaced` the layers whose hidden states are aligned (hidden_weight > 0)."""
    wants_hidden = bool(replaced) and settings.hidden_weight > 0

    def loss_fn(student, batch: dict) -> Tensor:
        inputs = model_inputs(batch)
        with torch.no_grad():
            teacher_hidden, theirs = final_hidden(teacher, inputs, wants_hidden)
        student_hidden, ours = final_hidden(student, inputs, wants_hidden)
        if wants_hidden:
            align = (token_alignment(ours.hidden_states, theirs.hidden_states, replaced) * target_mask(batch)).sum()
        loss = kd_loss_sum(student_hidden, LMHead.of(student), teacher_hidden, LMHead.of(teacher), batch["labels"],
                           settings.divergence, settings.temperature, settings.forward_weight, settings.ce_weight)
        return loss + settings.hidden_weight * align if wants_hidden else loss

    return loss_fn
