"""On a bare GPU image (torch + triton): each op of lctk.kernels and its benchmark import, and the op runs, with
transformers, datasets, pydantic, wandb, accelerate and typer unimportable."""

import subprocess
import sys

import pytest

BLOCKED = ["transformers", "datasets", "pydantic", "wandb", "accelerate", "typer"]
RUN_OP = {  # the op's import and one call giving o of shape (1, 5, 2, 3)
    "ssd": "from lctk.kernels.ssd import ssd\n"
           "o, _ = ssd(torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 2, 3))\n",
    "delta": "from lctk.kernels.delta import delta_rule\n"
             "q = torch.nn.functional.normalize(torch.randn(1, 5, 2, 4), dim=-1)\n"
             "o, _ = delta_rule(q, q, torch.randn(1, 5, 2, 3), -torch.rand(1, 5, 2, 4), torch.rand(1, 5, 2))\n",
}


@pytest.mark.parametrize("op", RUN_OP)
def test_the_op_and_its_benchmark_need_torch_only(op):
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        "import torch\n"
        + RUN_OP[op]
        + f"import lctk.kernels.{op}.bench\n"
        f"leaked = [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]\n"
        "assert not leaked, leaked\n"
        "print('ok', tuple(o.shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok (1, 5, 2, 3)" in done.stdout
