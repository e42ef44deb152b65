"""Which path `ssd` takes, and what `import lctk.kernels` pulls in."""

import subprocess
import sys

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


def test_import_needs_torch_only():
    """On a bare GPU image (torch + triton): lctk.kernels imports, and the op runs, with transformers, datasets,
    pydantic and wandb unimportable."""
    blocked = ["transformers", "datasets", "pydantic", "wandb", "accelerate", "typer"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import torch\n"
        "from lctk.kernels.ssd import ssd\n"
        "o, _ = ssd(torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 2, 3))\n"
        "import lctk.kernels.ssd.bench\n"
        f"leaked = [m for m in {blocked!r} if sys.modules.get(m) is not None]\n"
        "assert not leaked, leaked\n"
        "print('ok', tuple(o.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 5, 2, 3)" in done.stdout
