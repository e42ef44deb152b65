"""`lctk train --set train.context_parallel=2` under `accelerate launch` (2 CPU processes, gloo, one row split in two):
the losses of one process on the same rows (DDP and FSDP2), an exact resume, a `final/` that loads; a split the model
cannot take is one error line before anything is written."""

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


def launcher(port: int, config: str = "ddp-cpu.yaml") -> tuple[str, ...]:
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed")
    return (str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config),
            "--main_process_port", str(port))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TRAIN = {"steps": 4, "batch_size": 2}


@pytest.fixture(scope="module")
def single(tmp_path_factory, make_recipe, lctk):
    """One process on the whole rows: what a context-parallel run must reproduce."""
    folder = tmp_path_factory.mktemp("single")
    result = lctk("train", str(make_recipe(folder, "one", train=TRAIN)))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "runs" / "one"


def test_split_rows_train_like_one_process_and_resume(single, tmp_path, make_recipe, lctk):
    recipe = make_recipe(tmp_path, "split", train=TRAIN)
    split = lctk("train", str(recipe), "--set", "train.context_parallel=2", launcher=launcher(29541))
    assert split.returncode == 0, split.stderr[-3000:]
    assert "on 2 process(es), each row split over 2 (context parallel)" in split.stdout
    run_dir = tmp_path / "runs" / "split"
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-5)

    got = load_file(run_dir / "final" / "model.safetensors")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")  # as after a crash past the step-2 checkpoint
    shutil.rmtree(run_dir / "final")
    resumed = lctk("train", str(recipe), "--set", "train.context_parallel=2", "--resume", "auto",
                   launcher=launcher(29541))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    again = load_file(run_dir / "final" / "model.safetensors")
    for name in got:
        assert torch.equal(again[name], got[name]), name

    from transformers import AutoModelForCausalLM

    import lctk  # noqa: F401  (registers the hybrid with the Auto classes)

    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.pattern == "MA"


def test_split_rows_under_fsdp2(single, tmp_path, make_recipe, lctk):
    recipe = make_recipe(tmp_path, "fsdp", train={**TRAIN, "context_parallel": 2}, checkpoint={"every": None})
    result = lctk("train", str(recipe), launcher=launcher(29543, "fsdp-cpu.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2 over 2 processes" in result.stdout
    assert losses(tmp_path / "runs" / "fsdp") == pytest.approx(losses(single), rel=1e-5)


def test_titans_split_is_one_error_line(tmp_path, make_recipe, lctk):
    recipe = make_recipe(tmp_path, "titans", model={"pattern": "MT"}, train={"steps": 1, "context_parallel": 2})
    result = lctk("train", str(recipe), launcher=launcher(29542))
    assert result.returncode != 0
    assert "error: train.context_parallel: `T` (Titans) does not run context-parallel yet" in result.stderr
    assert not (tmp_path / "runs" / "titans").exists()


def test_a_split_larger_than_the_world_is_one_error_line(tmp_path, make_recipe, lctk):
    result = lctk("train", str(make_recipe(tmp_path, "odd", train={"steps": 1, "context_parallel": 2})))
    assert result.returncode != 0
    assert "error: train.context_parallel: 2 does not divide the number of processes 1" in result.stderr
    assert not (tmp_path / "runs" / "odd").exists()
