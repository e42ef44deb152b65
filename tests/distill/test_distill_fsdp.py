"""`lctk distill` under FSDP2 on 2 CPU processes (recipes/accelerate/fsdp-cpu.yaml): the align stage's mixers and every
stage's student are sharded afresh, train to the losses of one process with the same global batch, and are gathered
back whole for the next stage and for its saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_distill_command import write_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def distill(recipe: Path, *launcher: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "lctk.cli"] if launcher else [sys.executable, "-m", "lctk.cli"]
    return subprocess.run([*command, "distill", str(recipe), *extra], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})


def stage_losses(run_dir: Path, stage: int) -> list[float]:
    lines = (run_dir / f"stage-{stage}" / "distill" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def align_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "align" / "metrics.jsonl").read_text().splitlines()]


def test_two_fsdp_processes_distil_like_one(tmp_path):
    from tiny_teachers import save_teacher

    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed")
    recipe = write_recipe(tmp_path, save_teacher(tmp_path / "teacher"),
                          stages=[{"replace": 1, "by": "loo", "steps": 4}, {"replace": "+1", "by": "loo", "steps": 4}])
    one = distill(recipe)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = (str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp-cpu.yaml"),
                "--main_process_port", "29527")
    two = distill(recipe, *launcher, extra=("--set", "train.batch_size=2", "--set", f"run.output_dir={tmp_path / 'two'}"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("FSDP2 over 2 processes: this process holds 50.0%") == 3  # the align stage, then each stage
    # the align stage: one backward through the sharded mixers there, gradients taken layer by layer on one process
    assert align_losses(tmp_path / "two") == pytest.approx(align_losses(tmp_path / "run"), rel=1e-5)
    for stage in (1, 2):
        assert stage_losses(tmp_path / "two", stage) == pytest.approx(stage_losses(tmp_path / "run", stage), rel=1e-5)
    layouts = [json.loads((tmp_path / name / "stage-2" / "layout.json").read_text()) for name in ("run", "two")]
    assert layouts[0] == layouts[1]
    from transformers import AutoModelForCausalLM

    import lctk  # noqa: F401  (registers the hybrid with the Auto classes)

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "stage-2" / "model")
    assert student.config.pattern.count("M") == 2
