"""The delta-rule Triton kernels run by Triton's interpreter on CPU tensors, against the token-by-token recurrence and
the torch path.

Not collected by itself (the name does not start with test_): test_delta_triton_interpreter.py runs this file in a
fresh pytest process with TRITON_INTERPRET=1 and LCTK_KERNELS=triton (the interpreter must be on before triton is
first imported).
"""

import os

import pytest
import torch
from delta_testing import Case, assert_close, ground_truth, run_delta

from lctk.kernels.delta import delta_rule

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LCTK_KERNELS") != "triton":
    pytest.skip("run by test_delta_triton_interpreter.py under the interpreter", allow_module_level=True)


def test_the_kernels_are_interpreted():
    import lctk.kernels.delta.triton as kernels

    assert kernels.INTERPRET


CASES = {
    "scalar_batch_odd_T": (Case(batch=2, seq_len=37, key_dim=16, value_dim=16), 16),
    "channel_initial_odd_T": (Case(seq_len=21, key_dim=16, value_dim=16, decay="channel", use_initial=True), 16),
    "no_decay_chunk32": (Case(seq_len=33, key_dim=16, value_dim=16, decay=None, use_initial=True), 32),
    "scalar_cu_seqlens_empty_piece": (
        Case(seq_len=40, key_dim=12, value_dim=20, use_initial=True, cu_seqlens=(0, 7, 7, 25, 40)), 16),
    "channel_cu_seqlens": (
        Case(seq_len=30, key_dim=12, value_dim=20, decay="channel", use_initial=True, cu_seqlens=(0, 17, 30)), 16),
    "K_padded_V_in_blocks": (Case(seq_len=19, key_dim=20, value_dim=72, use_initial=True), 16),
    "channels_that_forget_at_once": (Case(seq_len=18, key_dim=16, value_dim=16, decay="channel", decay_rate=60.0), 16),
}


@pytest.mark.parametrize("name", CASES)
def test_fp32_matches_the_recurrence_and_the_torch_path(name, monkeypatch):
    case, chunk_size = CASES[name]
    inputs, truth = ground_truth(case)
    triton_result = run_delta(delta_rule, case, inputs, torch.float32, chunk_size)
    assert_close(triton_result, truth, rtol=2e-5)
    monkeypatch.setenv("LCTK_KERNELS", "torch")
    assert_close(triton_result, run_delta(delta_rule, case, inputs, torch.float32, chunk_size), rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, monkeypatch):
    """bf16/fp16 q, k, v (fp32 arithmetic inside): close to the torch path on the same rounded inputs."""
    case = Case(seq_len=20, key_dim=16, value_dim=16, use_initial=True)
    inputs, _ = ground_truth(case)
    triton_result = run_delta(delta_rule, case, inputs, dtype, 16)
    monkeypatch.setenv("LCTK_KERNELS", "torch")
    assert_close(triton_result, run_delta(delta_rule, case, inputs, dtype, 16), rtol=2e-2)


def test_triton_path_rejects_float64_and_wide_keys():
    x = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton path takes float32"):
        delta_rule(x, x, x, None, torch.zeros(1, 4, 1, dtype=torch.float64))
    wide = torch.zeros(1, 4, 1, 272)
    with pytest.raises(ValueError, match="K <= 256"):
        delta_rule(wide, wide, torch.zeros(1, 4, 1, 8), None, torch.zeros(1, 4, 1))
