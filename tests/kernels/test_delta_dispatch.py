"""Which path `delta_rule` takes (what importing it pulls in: tests/kernels/test_imports.py)."""

import pytest
import torch

from lctk.kernels.delta import delta_rule


def test_forcing_triton_on_cpu_without_the_interpreter_is_an_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("LCTK_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET=1"):
        delta_rule(x, x, x, None, torch.zeros(1, 4, 1))
