"""The delta-rule Triton kernels compiled for a CUDA device (no interpreter), against the token-by-token recurrence
and the torch path. Skipped without CUDA; `pytest -m gpu tests/kernels` on a GPU machine (part of `make gpu-check`)."""

import os

import pytest
import torch
from delta_testing import Case, assert_close, ground_truth, make_inputs, run_delta

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
# one config per kernel: each shape compiles once (set before the kernels module is first imported)
os.environ.setdefault("LCTK_TRITON_AUTOTUNE", "0")

from lctk.kernels.delta import delta_rule  # noqa: E402

CASES = {
    "gated_deltanet_odd_T": (Case(batch=2, seq_len=300, heads=3, key_dim=128, value_dim=256, use_initial=True), 64),
    "kda_channel_decay": (Case(seq_len=200, heads=2, key_dim=128, value_dim=128, decay="channel", use_initial=True), 64),
    "head_dim_256_chunk16": (Case(seq_len=150, key_dim=256, value_dim=64, use_initial=True), 16),
    "cu_seqlens": (Case(seq_len=400, key_dim=64, value_dim=64, decay="channel", use_initial=True,
                        cu_seqlens=(0, 1, 130, 130, 333, 400)), 64),
}


@pytest.mark.parametrize("name", CASES)
def test_fp32_matches_the_recurrence(name, monkeypatch):
    monkeypatch.delenv("LCTK_KERNELS", raising=False)
    case, chunk_size = CASES[name]
    inputs, truth = ground_truth(case)
    assert_close(run_delta(delta_rule, case, inputs, torch.float32, chunk_size, device="cuda"), truth, rtol=1e-4)


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_bf16_long_sequence_matches_the_torch_path(decay, monkeypatch):
    case = Case(batch=2, seq_len=4097, heads=4, key_dim=128, value_dim=128, decay=decay, use_initial=True, scale=0.1)
    inputs = make_inputs(case)
    monkeypatch.delenv("LCTK_KERNELS", raising=False)
    ours = run_delta(delta_rule, case, inputs, torch.bfloat16, 64, device="cuda")
    monkeypatch.setenv("LCTK_KERNELS", "torch")
    assert_close(ours, run_delta(delta_rule, case, inputs, torch.bfloat16, 64, device="cuda"), rtol=3e-2)
