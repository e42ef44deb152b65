"""Which path `delta_rule` takes, and what importing lctk.kernels.delta pulls in."""

import subprocess
import sys

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


def test_import_needs_torch_only():
    """On a bare GPU image (torch + triton): the op and its benchmark import, and the op runs, with transformers,
    datasets, pydantic and wandb unimportable."""
    blocked = ["transformers", "datasets", "pydantic", "wandb", "accelerate", "typer"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import torch\n"
        "from lctk.kernels.delta import delta_rule\n"
        "q = torch.nn.functional.normalize(torch.randn(1, 5, 2, 4), dim=-1)\n"
        "o, _ = delta_rule(q, q, torch.randn(1, 5, 2, 3), -torch.rand(1, 5, 2, 4), torch.rand(1, 5, 2))\n"
        "import lctk.kernels.delta.bench\n"
        f"leaked = [m for m in {blocked!r} if sys.modules.get(m) is not None]\n"
        "assert not leaked, leaked\n"
        "print('ok', tuple(o.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 5, 2, 3)" in done.stdout
