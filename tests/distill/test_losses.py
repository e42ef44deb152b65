"""The KD losses against independent references, the chunked KD loss against the full computation (loss and
gradients), and what the Trainer receives from them."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import tiny_llama

from lctk.distill.convert import replace_layers, student_from_teacher
from lctk.distill.losses import distill_loss_fn, kd_loss_sum, target_mask, token_kl
from lctk.distill.recipe import LossSection
from lctk.labels import shifted_targets
from lctk.train.losses import LMHead, token_ce


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
    torch.testing.assert_close(token_ce(logits, shifted_targets(labels))[0, 1:3], expected)
    assert token_ce(logits, shifted_targets(labels))[0, 3] == 0


def _full_kd(student_logits, teacher_logits, labels, kind, temperature, ce_weight):
    """The KD loss as it was: every logit of both models at once."""
    per_position = token_kl(student_logits, teacher_logits, kind, temperature, forward_weight=0.3)
    per_position = per_position + ce_weight * token_ce(student_logits, shifted_targets(labels))
    return (per_position * target_mask({"labels": labels})).sum()


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize(("kind", "temperature", "ce_weight"),
                         [("reverse_kl", 1.0, 0.0), ("forward_kl", 2.0, 0.5), ("mix", 1.5, 0.25)])
def test_chunked_kd_loss_equals_the_full_one(chunk, kind, temperature, ce_weight, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 11, 6, generator=generator).requires_grad_()
    weight = (torch.randn(23, 6, generator=generator) / 2).requires_grad_()
    teacher_hidden = torch.randn(2, 11, 9, generator=generator).requires_grad_()
    teacher_weight = torch.randn(23, 9, generator=generator) / 3
    labels = torch.randint(0, 23, (2, 11), generator=generator)
    labels[:, [0, 4]] = -100  # document starts
    labels[1, 7] = -100
    monkeypatch.setattr("lctk.train.losses.CHUNK_LOGITS", chunk * 23)
    ours = kd_loss_sum(hidden, LMHead(weight), teacher_hidden, LMHead(teacher_weight), labels, kind, temperature,
                       0.3, ce_weight)
    reference = _full_kd(hidden @ weight.T, (teacher_hidden @ teacher_weight.T).detach(), labels, kind, temperature,
                         ce_weight)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    *got, teacher_grad = torch.autograd.grad(ours * 3.0, (hidden, weight, teacher_hidden), allow_unused=True)
    want = torch.autograd.grad(reference * 3.0, (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert teacher_grad is None  # the teacher only gives targets


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
    per_position = token_kl(ours.logits, theirs.logits) + 0.5 * token_ce(ours.logits, shifted_targets(labels)) + 2.0 * align
    torch.testing.assert_close(total.detach(), (per_position * target_mask(batch)).sum(), rtol=1e-5, atol=1e-5)
