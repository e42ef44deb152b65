"""Attention -> Gated DeltaNet / KDA conversion: the copied projections equal the teacher's (kv heads repeated), `mil`
starts the layer attention-like (identity convolution, slow decay), `mil-plain` copies the projections only, and a
setting that cannot hold is one UserError naming it."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_teachers import tiny_llama

from lctk.distill.convert import replace_layers, student_from_teacher
from lctk.distill.recipe import DistillSection
from lctk.errors import UserError


@pytest.mark.parametrize("mixer, letter", [("gated_deltanet", "G"), ("kda", "K")])
def test_delta_students_take_the_attention_projections(mixer, letter):
    teacher = tiny_llama()
    student = replace_layers(student_from_teacher(teacher), [1, 2], mixer, "mil")
    assert student.config.pattern == f"A{letter}{letter}A"
    section = getattr(student.config, mixer)
    assert (section["num_heads"], section["head_dim"], section["expand_v"]) == (4, 16, 1.0)
    for index in (1, 2):
        ours, attention = student.model.layers[index].mixer, teacher.model.layers[index].self_attn
        assert torch.equal(ours.q_proj.weight, attention.q_proj.weight)
        assert torch.equal(ours.o_proj.weight, attention.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # 4 query heads read 2 kv heads: head h takes kv head h // 2
            theirs = getattr(attention, name).weight.unflatten(0, (2, 16))
            assert torch.equal(getattr(ours, name).weight.unflatten(0, (4, 16)), theirs.repeat_interleave(2, dim=0))
        taps = ours.conv_weight.detach()
        assert torch.equal(taps[:, -1], torch.ones(taps.shape[0])) and not taps[:, :-1].any()
        torch.testing.assert_close(ours.A_log.exp(), torch.full_like(ours.A_log, 0.1))
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()


def test_mil_plain_keeps_the_fresh_convolution_and_decay():
    teacher = tiny_llama()
    plain = replace_layers(student_from_teacher(teacher), [1], "gated_deltanet", "mil-plain")
    fresh = replace_layers(student_from_teacher(teacher), [1], "gated_deltanet", "random")
    ours, baseline = plain.model.layers[1].mixer, fresh.model.layers[1].mixer
    assert torch.equal(ours.q_proj.weight, teacher.model.layers[1].self_attn.q_proj.weight)
    assert not torch.equal(baseline.q_proj.weight, ours.q_proj.weight)
    assert torch.equal(ours.conv_weight, baseline.conv_weight) and torch.equal(ours.A_log, baseline.A_log)
    assert not math.isclose(ours.A_log.exp().mean().item(), 0.1)


def test_impossible_delta_settings_are_one_user_error():
    with pytest.raises(UserError, match=r"distill\.student\.settings: kda\.expand_v"):
        replace_layers(student_from_teacher(tiny_llama()), [0], "kda", "mil", settings={"expand_v": 0.3})


def test_the_recipe_takes_the_delta_students():
    section = DistillSection(teacher="t", student={"mixer": "kda", "init": "mil-plain"}, stages=[{"replace": 1}])
    assert section.student.mixer == "kda"
    with pytest.raises(ValueError, match="student.mixer"):
        DistillSection(teacher="t", student={"mixer": "deltanet"}, stages=[{"replace": 1}])
