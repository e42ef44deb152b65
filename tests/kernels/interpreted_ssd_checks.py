"""The Triton kernels run by Triton's interpreter on CPU tensors, against the sequential recurrence and the torch path.

Not collected by itself (the name does not start with test_): test_ssd_triton_interpreter.py runs this file in a
fresh pytest process with TRITON_INTERPRET=1 and LCTK_KERNELS=triton, because the interpreter must be switched on
before triton is first imported, which in a shared test process may already have happened.
"""

import os

import pytest
import torch
from ssd_testing import Case, assert_close, ground_truth, run_ssd

from lctk.kernels.ssd import ssd

if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("LCTK_KERNELS") != "triton":
    pytest.skip("run by test_ssd_triton_interpreter.py under the interpreter", allow_module_level=True)


def test_the_kernels_are_interpreted():
    import lctk.kernels.ssd.triton as kernels

    assert kernels.INTERPRET


CASES = {
    "odd_T": (Case(seq_len=37, key_dim=16, value_dim=16), 16),
    "batch_groups_initial": (Case(batch=2, seq_len=37, n_groups=2, per_group=2, key_dim=16, value_dim=16, use_initial=True), 16),
    "no_decay": (Case(seq_len=33, key_dim=16, value_dim=16, use_g=False, use_initial=True), 32),
    "cu_seqlens_empty_piece": (
        Case(seq_len=50, per_group=3, key_dim=20, value_dim=24, use_initial=True, cu_seqlens=(0, 7, 7, 30, 50)),
        16,
    ),
    "K_and_V_split_in_blocks": (Case(seq_len=21, key_dim=80, value_dim=72, use_initial=True), 16),
}


@pytest.mark.parametrize("name", CASES)
def test_fp32_matches_the_recurrence_and_the_torch_path(name, monkeypatch):
    case, chunk_size = CASES[name]
    inputs, truth = ground_truth(case)
    triton_result = run_ssd(ssd, case, inputs, torch.float32, chunk_size)
    assert_close(triton_result, truth, rtol=2e-5)
    monkeypatch.setenv("LCTK_KERNELS", "torch")
    assert_close(triton_result, run_ssd(ssd, case, inputs, torch.float32, chunk_size), rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype, monkeypatch):
    """bf16/fp16 q, k, v (fp32 accumulation; dots are fp32 under the interpreter, states stored in the input's
    precision for bf16): close to the torch path on the same rounded inputs."""
    case = Case(seq_len=40, per_group=2, key_dim=16, value_dim=16, use_initial=True)
    inputs, _ = ground_truth(case)
    triton_result = run_ssd(ssd, case, inputs, dtype, 16)
    monkeypatch.setenv("LCTK_KERNELS", "torch")
    assert_close(triton_result, run_ssd(ssd, case, inputs, dtype, 16), rtol=2e-2)


def test_based_feature_size():
    """BASED's Taylor features: K = 1 + 16 + 256 = 273, five K blocks of 64, no decay."""
    case = Case(seq_len=18, key_dim=273, value_dim=16, use_g=False)
    inputs, truth = ground_truth(case)
    assert_close(run_ssd(ssd, case, inputs, torch.float32, 16), truth, rtol=2e-5)


def test_triton_path_rejects_float64():
    x = torch.zeros(1, 4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton path takes"):
        ssd(x, x, x)
