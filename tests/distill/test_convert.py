"""Conversion invariants: zero layers converted = the teacher exactly; copied slices equal the teacher's tensors;
stages carry earlier mixers over."""

from __future__ import annotations

import pytest
import torch
from tiny_teachers import TINY, tiny_llama
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lctk.distill.convert import layout, replace_layers, student_from_teacher
from lctk.errors import UserError


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True])
def test_zero_layers_converted_reproduces_llama_logits_exactly(tied):
    teacher = tiny_llama(tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    student = student_from_teacher(teacher)
    ids = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
    assert student.config.pattern == "AAAA"
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))


def test_qwen2_biases_and_mistral_sliding_window_carry_over():
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, **TINY)).eval()
    with torch.no_grad():  # make the q/k/v biases matter
        for layer in qwen.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.normal_(0, 0.5)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=300, sliding_window=8, **TINY)).eval()
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(2))
    for teacher, pattern in ((qwen, "AAAA"), (mistral, "SSSS")):
        student = student_from_teacher(teacher)
        assert student.config.pattern == pattern
        torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5)
    assert student.config.attention["window"] == 8


def test_copied_slices_equal_the_teachers_tensors():
    teacher = tiny_llama()
    student = replace_layers(student_from_teacher(teacher), [1, 3], "mamba2", "mil")
    assert student.config.pattern == "AMAM"
    settings = student.config.mamba2
    assert (settings["n_groups"], settings["xb_heads"], settings["state_size"], settings["head_dim"]) == (4, 2, 16, 16)
    for index in range(4):
        ours, theirs = student.model.layers[index], teacher.model.layers[index]
        assert torch.equal(ours.mixer_norm.weight, theirs.input_layernorm.weight)
        assert torch.equal(ours.mlp_norm.weight, theirs.post_attention_layernorm.weight)
        assert torch.equal(ours.mlp.down_proj.weight, theirs.mlp.down_proj.weight)
        attention = theirs.self_attn
        if index in (1, 3):
            mamba = ours.mixer
            rows = mamba.in_proj.weight.split([64, 32, 32, 64, 4])  # z, x (2 kv heads x 16), B, C (4 x 16), dt
            assert torch.equal(rows[1], attention.v_proj.weight)
            assert torch.equal(rows[2], attention.k_proj.weight)
            assert torch.equal(rows[3], attention.q_proj.weight)
            assert torch.equal(mamba.out_proj.weight, attention.o_proj.weight)
        else:
            assert torch.equal(ours.mixer.q_proj.weight, attention.q_proj.weight)
            assert torch.equal(ours.mixer.o_proj.weight, attention.o_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_a_later_stage_keeps_earlier_mixers_and_converts_only_new_layers():
    first = replace_layers(student_from_teacher(tiny_llama()), [2], "mamba2", "mil")
    with torch.no_grad():
        first.model.layers[2].mixer.in_proj.weight.add_(1.0)  # stands for trained weights
    second = replace_layers(first, [0], "mamba2", "mil", seed=1)
    assert second.config.pattern == "MAMA"
    for name, tensor in first.state_dict().items():
        if not name.startswith("model.layers.0.mixer."):
            assert torch.equal(second.state_dict()[name], tensor), name
    assert layout(second)["replaced_layers"] == [0, 2]
    with pytest.raises(ValueError, match="not an attention layer"):
        replace_layers(second, [2])


def test_based_and_lact_students_take_the_attention_projections():
    teacher = tiny_llama()
    based = replace_layers(student_from_teacher(teacher), [1], "based", "mil")
    mixer, attention = based.model.layers[1].mixer, teacher.model.layers[1].self_attn
    assert torch.equal(mixer.o_proj.weight, attention.o_proj.weight)
    assert torch.equal(mixer.v_proj.weight[16:32], attention.v_proj.weight[:16])  # query head 1 reads kv head 0
    lact = replace_layers(student_from_teacher(teacher), [1], "lact", "mil")
    q, k, v = lact.model.layers[1].mixer.qkv.weight.chunk(3)
    assert torch.equal(q, attention.q_proj.weight)
    assert torch.equal(k[48:64], attention.k_proj.weight[16:32])
    ids = torch.randint(0, 320, (1, 20))
    for model in (based, lact):
        assert torch.isfinite(_logits(model, ids)).all()


def test_unknown_student_mixer_is_a_user_error():
    with pytest.raises(UserError, match="distill.student.mixer"):
        replace_layers(student_from_teacher(tiny_llama()), [0], "titans")
