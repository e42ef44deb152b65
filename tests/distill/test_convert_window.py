"""Attention -> sliding-window attention (`S`) conversion: everything maps, so a window that covers the sequence is
the teacher exactly, a short one equals the teacher's weights under a windowed mask (a Mistral with that window), and
the student saves and reloads with the same logits."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import TINY, tiny_llama
from transformers import (
    AutoModelForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lctk.distill.convert import DEFAULT_WINDOW, replace_layers, student_from_teacher
from lctk.distill.recipe import DistillSection
from lctk.errors import UserError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(length: int, vocab: int = 320):
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(3))


def test_a_window_covering_the_sequence_is_the_teacher_exactly():
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(vocab_size=320, **TINY)).eval()
    with torch.no_grad():  # q/k/v biases that matter, so that a bias left behind would show
        for layer in teacher.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    student = replace_layers(student_from_teacher(teacher), [1, 3], "sliding_window", settings={"window": 40})
    assert student.config.pattern == "ASAS" and student.config.attention["window"] == 40
    assert student.config.attention["qkv_bias"]
    ids = _ids(40)
    assert torch.equal(_logits(student, ids), _logits(student_from_teacher(teacher), ids))
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5)


def test_a_short_window_is_the_teachers_attention_under_that_window():
    teacher = tiny_llama()
    student = replace_layers(student_from_teacher(teacher), [0, 1, 2, 3], "sliding_window", settings={"window": 6})
    ids = _ids(30)
    assert (_logits(student, ids) - _logits(teacher, ids)).abs().max() > 1e-2
    windowed = MistralForCausalLM(MistralConfig(vocab_size=320, sliding_window=6, **TINY)).eval()
    windowed.load_state_dict(teacher.state_dict())  # the same weights, keys limited to the last 6 tokens
    torch.testing.assert_close(_logits(student, ids), _logits(windowed, ids), rtol=0, atol=1e-5)


def test_the_default_window_and_a_saved_student_reloads_with_the_same_logits(tmp_path):
    student = replace_layers(student_from_teacher(tiny_llama()), [2], "sliding_window")
    assert student.config.attention["window"] == DEFAULT_WINDOW
    student = replace_layers(student_from_teacher(tiny_llama()), [2], "sliding_window", settings={"window": 5})
    student.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert again.config.pattern == "AASA" and again.config.attention["window"] == 5
    ids = _ids(24)
    assert torch.equal(_logits(again, ids), _logits(student, ids))


def test_bad_window_settings_are_one_user_error():
    student = student_from_teacher(tiny_llama())
    with pytest.raises(UserError, match=r"distill\.student\.settings: 'qkv_bias' is not a sliding_window setting"):
        replace_layers(student, [0], "sliding_window", settings={"qkv_bias": True})
    with pytest.raises(UserError, match=r"distill\.student\.settings: attention\.window"):
        replace_layers(student, [0], "sliding_window", settings={"window": 0})
    with pytest.raises(UserError, match=r"distill\.student\.settings\.window: 4 differs from the sliding window 8"):
        replace_layers(replace_layers(student, [0], "sliding_window", settings={"window": 8}), [1], "sliding_window",
                       settings={"window": 4})


def test_the_recipe_takes_the_sliding_window_student():
    section = DistillSection(teacher="t", student={"mixer": "sliding_window", "settings": {"window": 128}},
                             stages=[{"replace": 1}])
    assert section.student.mixer == "sliding_window"
