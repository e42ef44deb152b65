"""`lctk train` against disk faults, through the real entry point: a full disk or an unwritable folder at any write
ends in one `error:` line naming the path and the cause, exit code 2, no traceback and no temporary file left;
freeing the disk and resuming finishes the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState
from disk_faults import failing_writes, leftovers, limited_file_size, unwritable

from lctk.cli import main

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def fresh_accelerator_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LCTK_CACHE", str(tmp_path / "cache"))
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def lctk(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`lctk ARGS` in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["lctk", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
        raise SystemExit(0)
    return done.value.code, capsys.readouterr().err


@pytest.fixture
def recipe(make_recipe):
    return lambda folder, steps=2: make_recipe(folder, "r", train={"steps": steps}, checkpoint={"every": 1})


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.slow
def test_a_checkpoint_past_the_disk_is_one_line_and_a_resume_finishes_the_run(tmp_path, recipe):
    """A real kernel-level fault in a subprocess: no file may grow past 120 kB, so the first checkpoint's weights
    (about 190 kB) cannot be written, whatever writes them."""
    path = recipe(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    command = [sys.executable, "-m", "lctk.cli", "train", str(path)]
    env = {**os.environ, "LCTK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    failed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
                            preexec_fn=limited_file_size(120_000))
    assert failed.returncode == 2
    line = one_error_line(failed.stderr)
    assert line == f"error: file too large writing {run_dir}/checkpoints/step-00000001 (model.safetensors)"
    assert leftovers(tmp_path) == [] and not list((run_dir / "checkpoints").iterdir())
    resumed = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True, env=env, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "final" / "model.safetensors").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("read_only", [False, True])
def test_resuming_into_a_folder_lctk_cannot_write_in_is_one_line_before_any_work(tmp_path, monkeypatch, capsys,
                                                                                  recipe, read_only):
    path = recipe(tmp_path, steps=1)
    run_dir = tmp_path / "runs" / "r"
    assert lctk(monkeypatch, capsys, "train", path)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cause = "read-only file system" if read_only else "permission denied"
    with unwritable(monkeypatch, run_dir, read_only=read_only):
        code, err = lctk(monkeypatch, capsys, "train", path, "--resume", "auto")
    assert code == 2 and one_error_line(err) == f"error: run.output_dir: cannot write in {run_dir} ({cause})"
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_write_that_fails_outside_lctk_s_own_writers_is_translated_at_the_command_line(tmp_path, monkeypatch,
                                                                                         capsys, recipe):
    """metrics.jsonl is appended to in place: its ENOSPC reaches the entry point, which names it in one line."""
    path = recipe(tmp_path)
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    with failing_writes(monkeypatch, metrics, allowed=0):
        code, err = lctk(monkeypatch, capsys, "train", path)
    assert code == 2 and one_error_line(err) == f"error: no space left on device writing {metrics}"
    assert leftovers(tmp_path) == []


def test_a_full_disk_under_the_final_model_is_one_line_and_leaves_the_checkpoints(tmp_path, monkeypatch, capsys,
                                                                                  recipe):
    path = recipe(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    with failing_writes(monkeypatch, run_dir / "final.tmp", allowed=0):  # its config.json (the weights are Rust's)
        code, err = lctk(monkeypatch, capsys, "train", path)
    assert code == 2 and one_error_line(err) == f"error: no space left on device writing {run_dir}/final (config.json)"
    assert leftovers(tmp_path) == [] and not (run_dir / "final").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert lctk(monkeypatch, capsys, "train", path, "--resume", "auto")[0] == 0
    assert (run_dir / "final" / "config.json").is_file()
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["steps"] == 2
