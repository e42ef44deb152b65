"""Checkpoints against disk faults and damage: no room, or a write the filesystem refuses (on any process), is one
line that leaves no partial checkpoint, the earlier ones intact and a resume that reaches the uninterrupted weights;
a damaged optimizer.pt or rng file sends the resume to the previous checkpoint; the divergence message suggests only
what the recipe does not already do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from disk_faults import failing_writes, file_size_limit, leftovers
from test_trainer import tiny_model, trainer, weights

from lctk import files
from lctk.errors import UserError
from lctk.recipe import TrainSection
from lctk.train.checkpoint import latest_valid, list_checkpoints, problem_with
from lctk.train.trainer import divergence_advice

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def reference(tmp_path):
    """The weights of 3 uninterrupted steps."""
    run = trainer(tmp_path / "reference", tiny_model(), steps=3)
    run.fit()
    return weights(run.model)


@pytest.mark.parametrize("fault", ["no room", "optimizer.pt: disk full", "model.safetensors: file size limit"])
def test_a_checkpoint_the_disk_cannot_take_is_one_line_and_the_run_resumes_to_the_same_weights(tmp_path, monkeypatch,
                                                                                             reference, fault):
    run_dir = tmp_path / "run"
    folder, target = run_dir / "checkpoints", run_dir / "checkpoints" / "step-00000003"
    if fault == "no room":
        faulty = monkeypatch.context()
        expected = rf"^no space left on device writing {target}: ~\d+ kB needed, 50 kB free in {folder}$"
    elif fault.startswith("optimizer.pt"):
        faulty = failing_writes(monkeypatch, folder, allowed=0)  # safetensors (Rust) is not affected: it comes first
        expected = rf"^no space left on device writing {target} \(optimizer.pt\)$"
    else:
        faulty = file_size_limit(8192)
        expected = rf"^file too large writing {target} \(model.safetensors\)$"
    run = trainer(run_dir, tiny_model(), steps=3)
    save = run._save

    def third_save_fails():
        if run.state.step < 3:
            return save()
        with faulty as patch:
            if fault == "no room":
                patch.setattr(files, "free_bytes", lambda _: 50_000)
            return save()

    run._save = third_save_fails
    with pytest.raises(UserError, match=expected):
        run.fit()
    assert leftovers(run_dir) == [] and [p.name for p in list_checkpoints(folder)] == ["step-00000001", "step-00000002"]
    assert all(problem_with(path) is None for path in list_checkpoints(folder))
    resumed = trainer(run_dir, tiny_model(seed=1), steps=3)
    resumed.fit("auto")
    assert resumed.state.step == 3
    for name, value in weights(resumed.model).items():
        assert torch.equal(value, reference[name]), name


def test_what_a_killed_save_left_is_removed_by_the_next_run(tmp_path):
    trainer(tmp_path, tiny_model(), steps=1).fit()
    folder = tmp_path / "checkpoints"
    for leftover in ("step-00000002.tmp", "step-00000001.old"):
        (folder / leftover).mkdir()
        (folder / leftover / "model.safetensors").write_bytes(b"partial")
    trainer(tmp_path, tiny_model(), steps=2).fit("auto")
    assert leftovers(tmp_path) == [] and [p.name for p in list_checkpoints(folder)] == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("damaged", ["optimizer.pt", "rng-0.pt", "unlisted rng-0.pt"])
def test_a_damaged_optimizer_or_rng_file_sends_the_resume_to_the_previous_checkpoint(tmp_path, damaged):
    trainer(tmp_path, tiny_model(), steps=2).fit()
    folder = tmp_path / "checkpoints"
    newest = folder / "step-00000002"
    if damaged == "unlisted rng-0.pt":  # gone, and its manifest entry with it: the manifest must still list it
        (newest / "rng-0.pt").unlink()
        manifest = json.loads((newest / "manifest.json").read_text())
        del manifest["files"]["rng-0.pt"]
        (newest / "manifest.json").write_text(json.dumps(manifest))
        problem = "manifest.json does not list rng-0.pt"
    else:
        data = bytearray((newest / damaged).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / damaged).write_bytes(bytes(data))
        problem = f"{damaged} does not match its checksum"
    warnings = []
    assert latest_valid(folder, warnings.append) == folder / "step-00000001"
    assert warnings == [f"checkpoint {newest} is damaged ({problem}); trying the previous one"]
    with pytest.raises(UserError, match=rf"^--resume: checkpoint {newest} is damaged \({problem}\)$"):
        trainer(tmp_path, tiny_model(), steps=3)._resume(str(newest))
    resumed = trainer(tmp_path, tiny_model(), steps=3)
    assert resumed._resume("auto") == str(folder / "step-00000001") and resumed.state.step == 1


def test_the_divergence_advice_names_only_what_the_recipe_can_still_change():
    fp32 = divergence_advice(TrainSection(steps=1, lr=1e-2, precision="fp32", warmup_steps=10))
    assert fp32 == "try a lower train.lr (it is 0.01; try 0.0025); if it still diverges, check the model settings"
    bf16 = divergence_advice(TrainSection(steps=1, lr=3e-4, precision="bf16", clip=None))
    assert bf16 == ("try a lower train.lr (it is 0.0003; try 7.5e-05), train.precision: fp32 (it is bf16), "
                    "train.clip: 1.0 (gradient clipping is off) or train.warmup_steps of a few percent of the steps "
                    "(there is no warm-up); if it still diverges, check the model settings")


SAVE_ON_TWO_PROCESSES = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_trainer import tiny_model, trainer
from lctk import files
from lctk.errors import UserError
from lctk.train import checkpoint
rank = int(os.environ["RANK"])
run = trainer(Path({folder!r}), tiny_model(), steps=1)
real = checkpoint.save_torch
def save_torch(obj, path):  # the second process's disk refuses its rng file
    if rank == 1 and path.name.startswith("rng-"):
        raise OSError(5, "Input/output error", str(path))
    return real(obj, path)
checkpoint.save_torch = save_torch
try:
    run.fit()
except UserError as error:
    print(f"rank {{rank}}: {{error}}", flush=True)
"""


@pytest.mark.slow
def test_a_write_refused_on_one_process_stops_every_process_with_the_same_line(tmp_path):
    """No process waits forever for one that failed: they agree, and the main one removes the partial checkpoint."""
    script = SAVE_ON_TWO_PROCESSES.format(tests=str(ROOT / "tests" / "train"), folder=str(tmp_path))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    processes = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [process.communicate(timeout=240) for process in processes]
    line = f"input/output error writing {tmp_path / 'checkpoints' / 'step-00000001'} (rng-1.pt)"
    lines = [out.strip().splitlines()[-1] if out.strip() else err[-2000:] for out, err in outputs]
    assert lines == [f"rank 0: {line}", f"rank 1: {line}"]
    assert leftovers(tmp_path) == [] and list_checkpoints(tmp_path / "checkpoints") == []
