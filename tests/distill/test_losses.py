"""The KD losses against independent references, and what the Trainer receives from them."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import tiny_llama

from lctk.distill.convert import replace_layers, student_from_teacher
from lctk.distill.losses import distill_loss_fn, target_mask, token_ce, token_kl
from lctk.distill.recipe import LossSection


def _reference_kl(p_logits, q_logits):
    """KL(P || Q) per position through torch.distributions."""
    p = torch.distributions.Categorical(logits=p_logits.double())
    q = torch.distributions.Categorical(logits=q_logits.double())
    return torch.distributions.kl_divergence(p, q).float()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergences_match_the_definitions(temperature):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator) * 3, torch.randn(2, 5, 11, generator=generator) * 3
    scale = temperature**2
    reverse = _reference_kl(student / temperature, teacher / temperature) * scale
    forward = _reference_kl(teacher / temperature, student / temperature) * scale
    torch.testing.assert_close(token_kl(student, teacher, "reverse_kl", temperature), reverse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_kl(student, teacher, "forward_kl", temperature), forward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(token_kl(student, teacher, "mix", temperature, forward_weight=0.25),
                               0.25 * forward + 0.75 * reverse, rtol=1e-5, atol=1e-6)
    assert float(token_kl(teacher, teacher).abs().max()) < 1e-6


def test_mask_and_cross_entropy_follow_the_shifted_labels():
    labels = torch.tensor([[5, -100, 7, 8]])
    assert target_mask({"labels": labels}).tolist() == [[False, True, True, False]]
    logits = torch.randn(1, 4, 10)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([7, 8]), reduction="none")
    torch.testing.assert_close(token_ce(logits, labels)[0, 1:3], expected)
    assert token_ce(logits, labels)[0, 3] == 0


def test_loss_fn_sums_the_counted_positions():
    teacher = student_from_teacher(tiny_llama()).requires_grad_(False)
    student = replace_layers(teacher, [1], "mamba2", "mil")
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "position_ids": torch.arange(16).expand(2, 16), "labels": labels}
    settings = LossSection(ce_weight=0.5, hidden_weight=2.0)
    total = distill_loss_fn(teacher, settings, [1])(student, batch)
    with torch.no_grad():
        ours = student(input_ids=ids, output_hidden_states=True)
        theirs = teacher(input_ids=ids, output_hidden_states=True)
    align = ((ours.hidden_states[2] - theirs.hidden_states[2]).pow(2).sum(-1) / theirs.hidden_states[2].pow(2).sum(-1))
    per_position = token_kl(ours.logits, theirs.logits) + 0.5 * token_ce(ours.logits, labels) + 2.0 * align
    torch.testing.assert_close(total.detach(), (per_position * target_mask(batch)).sum(), rtol=1e-5, atol=1e-5)
    assert float(distill_loss_fn(teacher, settings, [1], align_only=True)(teacher, batch)) == 0.0
