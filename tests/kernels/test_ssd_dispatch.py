"""Which path `ssd` takes (what importing it pulls in: tests/kernels/test_imports.py)."""

import pytest
import torch

from lctk.kernels.ssd import backend_for


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "torch"),
        ({"LCTK_KERNELS": "torch"}, "torch"),
        ({"LCTK_KERNELS": "auto"}, "torch"),
        ({"TRITON_INTERPRET": "1"}, "torch"),  # the interpreter alone keeps CPU tensors on the fast torch path
        ({"LCTK_KERNELS": "triton", "TRITON_INTERPRET": "1"}, "triton"),
    ],
)
def test_cpu_tensors(env, expected, monkeypatch):
    monkeypatch.delenv("LCTK_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if expected == "triton":
        pytest.importorskip("triton")
    assert backend_for(torch.zeros(1)) == expected


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LCTK_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET=1"):
        backend_for(torch.zeros(1))


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("LCTK_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LCTK_KERNELS must be"):
        backend_for(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_tensors_take_triton(monkeypatch):
    monkeypatch.delenv("LCTK_KERNELS", raising=False)
    assert backend_for(torch.zeros(1, device="cuda")) == "triton"
