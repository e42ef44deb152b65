"""`lctk train` on several processes through the shipped accelerate configs (recipes/accelerate/): DDP and FSDP2 on
2 CPU processes over gloo give the losses and weights of one process with the same global batch; FSDP2 really
shards (each process holds half of the parameters), resumes exactly and leaves a final/ that loads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def launcher(config: str, port: int) -> tuple[str, ...]:
    if shutil.which("accelerate", path=str(ACCELERATE.parent)) is None:
        pytest.skip("accelerate launcher not installed")
    return (str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config),
            "--main_process_port", str(port))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, make_recipe, lctk):
    """One process, 4 rows per step: what two processes of 2 rows must reproduce."""
    folder = tmp_path_factory.mktemp("single")
    result = lctk("train", str(make_recipe(folder, "one", train={"steps": 4, "batch_size": 4}, checkpoint={"every": 2})))
    assert result.returncode == 0, result.stderr
    return folder / "runs" / "one"


@pytest.mark.parametrize("config, port, shown", [
    ("ddp-cpu.yaml", 29517, "DDP over 2 processes"),
    ("fsdp-cpu.yaml", 29518, "FSDP2 over 2 processes: this process holds 50.0% of"),
])
def test_two_processes_match_one_with_the_same_global_batch(config, port, shown, single, tmp_path, make_recipe, lctk):
    recipe = make_recipe(tmp_path, "two", train={"steps": 4, "batch_size": 2}, checkpoint={"every": 2})
    double = lctk("train", str(recipe), launcher=launcher(config, port))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 process(es)" in double.stdout and shown in double.stdout
    run_dir = tmp_path / "runs" / "two"
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5)
    expected, got = load_file(single / "final" / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    if config.startswith("fsdp"):
        # resume from the step-2 checkpoint, as after a crash: the same final weights
        shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
        shutil.rmtree(run_dir / "final")
        resumed = lctk("train", str(recipe), "--resume", "auto", launcher=launcher(config, port))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout
        again = load_file(run_dir / "final" / "model.safetensors")
        for name in got:
            assert torch.equal(again[name], got[name]), name

        from transformers import AutoModelForCausalLM

        import lctk as package  # noqa: F401  (registers the hybrid with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
        assert sum(p.numel() for p in model.parameters()) > 0 and model.config.pattern == "MA"


def test_an_fsdp1_config_is_refused_in_one_line(tmp_path, make_recipe, lctk):
    config = (ROOT / "recipes" / "accelerate" / "fsdp-cpu.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1")
    (tmp_path / "fsdp1.yaml").write_text(config)
    recipe = make_recipe(tmp_path, "v1", train={"steps": 1, "batch_size": 2})
    launch = (*launcher("fsdp-cpu.yaml", 29519)[:2], "--config_file", str(tmp_path / "fsdp1.yaml"),
              "--main_process_port", "29519")
    result = lctk("train", str(recipe), launcher=launch)
    assert result.returncode != 0
    assert "error: fsdp_version: 1 in the accelerate config; lctk supports FSDP2 (fsdp_version: 2)" in result.stderr
    assert not (tmp_path / "runs" / "v1").exists()
