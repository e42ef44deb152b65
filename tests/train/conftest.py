"""A tiny recipe (bytes tokenizer, a local text file, a two-layer hybrid) that trains in seconds on a CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def tiny_recipe(folder: Path, name: str = "tiny", **sections) -> Path:
    text = folder / "text.txt"
    if not text.exists():
        words = "the cat sat on a mat while seven dogs ran past the old red barn near river".split()
        text.write_text(" ".join(words[(i * 7) % len(words)] for i in range(6000)))
    recipe = {
        "run": {"name": name, "output_dir": str(folder / "runs" / name), "seed": 0},
        "model": {
            "pattern": "MA",
            "hidden_size": 32,
            "num_attention_heads": 2,
            "mamba2": {"state_size": 8, "head_dim": 16, "chunk_size": 8},
        },
        "tokenizer": "bytes",
        "data": {"seq_len": 32, "sources": [{"text": str(text)}, {"task": "copy", "weight": 0.5}]},
        "train": {"steps": 8, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "precision": "fp32"},
        "checkpoint": {"every": 2, "keep_last": 3},
        "logging": {"every": 1, "wandb": {"mode": "disabled"}},
        "eval": {"before": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def lctk_command(*args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [*launcher, "-m", "lctk.cli", *args] if launcher else [sys.executable, "-m", "lctk.cli", *args]


def run_lctk(*args: str, launcher: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m lctk.cli ARGS` in a subprocess with one thread per process (reproducible, and fair on 2 cores)."""
    return subprocess.run(lctk_command(*args, launcher=launcher), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=ROOT)


def start_lctk(*args: str) -> subprocess.Popen:
    return subprocess.Popen(lctk_command(*args), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="session")
def make_recipe():
    return tiny_recipe


@pytest.fixture(scope="session")
def lctk():
    """Run (or with start=True, start) the lctk command line in a subprocess."""

    def call(*args: str, launcher: tuple[str, ...] = (), start: bool = False):
        return start_lctk(*args) if start else run_lctk(*args, launcher=launcher)

    return call
