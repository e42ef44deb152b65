"""`lctk extend` with training stages under FSDP2 on 2 CPU processes (recipes/accelerate/fsdp-cpu.yaml): the stages
train to the losses of one process with the same global batch, and only the main process writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lctk import HybridConfig, HybridForCausalLM
from lctk.data.tokenizer import build_tokenizer
from lctk.tasks.corpus import builtin_documents

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def extend(recipe: Path, *launcher: str) -> subprocess.CompletedProcess:
    command = [*launcher, "-m", "lctk.cli"] if launcher else [sys.executable, "-m", "lctk.cli"]
    return subprocess.run([*command, "extend", str(recipe)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})


def write_recipe(folder: Path, model: Path, name: str, batch_size: int) -> Path:
    text = folder / "text.txt"
    text.write_text("\n\n".join(builtin_documents("train")[:20]))
    recipe = {
        "run": {"name": name, "output_dir": str(folder / name)},
        "data": {"sources": [{"text": str(text)}]},
        "train": {"steps": 3, "batch_size": batch_size, "lr": 1e-3, "precision": "fp32"},
        "logging": {"every": 1, "wandb": {"mode": "disabled"}},
        "eval": {"suites": []},
        "extend": {"model": str(model), "length": 128, "rope": {"method": "linear"},
                   "stages": [{"seq_len": "2x", "rope": {"factor": 2}}, {"seq_len": "4x", "steps": 2, "long_share": 1.0}]},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_losses(run_dir: Path, stage: int) -> list[float]:
    lines = (run_dir / "stages" / str(stage) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_two_fsdp_processes_extend_like_one(tmp_path):
    if not ACCELERATE.exists():
        pytest.skip("accelerate launcher not installed")
    tokenizer = build_tokenizer("bytes", None, None)
    torch.manual_seed(0)
    config = HybridConfig(pattern="MAM", vocab_size=320, hidden_size=32, num_attention_heads=2,
                          max_position_embeddings=32, mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 16},
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.train_length = 32
    HybridForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    one = extend(write_recipe(tmp_path, tmp_path / "model", "one", batch_size=2))
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = (str(ACCELERATE), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp-cpu.yaml"),
                "--main_process_port", "29537")
    two = extend(write_recipe(tmp_path, tmp_path / "model", "two", batch_size=1), *launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("FSDP2 over 2 processes: this process holds 50.0%") == 2  # one per stage, main only
    assert two.stdout.count("saved: ") == 1
    for stage in (1, 2):
        assert stage_losses(tmp_path / "two", stage) == pytest.approx(stage_losses(tmp_path / "one", stage), rel=1e-5)
    expected = load_file(tmp_path / "one" / "final" / "model.safetensors")
    got = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
