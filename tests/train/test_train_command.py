"""`lctk train` end to end in subprocesses: the run dir, and a SIGKILL mid-run resumed to bit-identical weights
(several processes: test_launch_configs.py)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
STEPS, EVERY = 24, 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_recipe, lctk):
    """One uninterrupted run, shared by the tests below."""
    folder = tmp_path_factory.mktemp("reference")
    recipe = make_recipe(folder, "ref", train={"steps": STEPS}, checkpoint={"every": EVERY})
    result = lctk("train", str(recipe))
    assert result.returncode == 0, result.stderr
    return folder, recipe, result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_leaves_a_loadable_model_metrics_and_its_resolved_recipe(reference):
    folder, recipe, result = reference
    run_dir = folder / "runs" / "ref"
    assert f"step {STEPS}/{STEPS}" in result.stdout and result.stdout.strip().splitlines()[-1].startswith(f"done: {STEPS} steps")
    assert "Traceback" not in result.stderr
    logged = metrics(run_dir)
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert logged[-1]["loss"] < logged[0]["loss"]
    resolved = (run_dir / "recipe.yaml").read_text()
    assert "schedule: cosine" in resolved and "kind: train" in resolved

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lctk  # noqa: F401  (registers the hybrid with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    assert model.config.train_length == 32


def test_an_existing_run_is_refused_resumed_or_checked_against_the_recipe(reference, lctk):
    folder, recipe, _ = reference
    again = lctk("train", str(recipe))
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    finished = lctk("train", str(recipe), "--resume", "auto")
    assert finished.returncode == 0, finished.stderr
    assert f"at step {STEPS}" in finished.stdout
    changed = lctk("train", str(recipe), "--resume", "auto", "--set", "model.hidden_size=64")
    assert changed.returncode == 2 and changed.stderr.startswith("error: model.hidden_size: differs from the run")


def test_sigkill_mid_run_then_resume_gives_the_same_weights(reference, tmp_path, make_recipe, lctk):
    folder, _, _ = reference
    recipe = make_recipe(tmp_path, "killed", train={"steps": STEPS}, checkpoint={"every": EVERY})
    run_dir = tmp_path / "runs" / "killed"
    process = lctk("train", str(recipe), start=True)
    target = run_dir / "checkpoints" / "step-00000008"
    deadline = time.monotonic() + 240
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "final").exists(), "the run ended before the kill"
    resumed = lctk("train", str(recipe), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected = load_file(folder / "runs" / "ref" / "final" / "model.safetensors")
    got = load_file(run_dir / "final" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
