"""Experiment trackers through accelerate: wandb stays off unless the recipe or WANDB_MODE turns it on, WANDB_PROJECT
names the project, steps and the eval results reach the tracker before it closes, and an online run without a key
or a tracker whose package is missing is one line before any work. wandb runs offline only (no network)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from lctk.recipe import load_recipe
from lctk.train.run import train_recipe


def no_wandb_environment(monkeypatch, tmp_path):
    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))  # where wandb would write if it ignored dir=
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no netrc, no wandb settings


def test_wandb_is_off_unless_asked(monkeypatch, tmp_path, make_recipe):
    no_wandb_environment(monkeypatch, tmp_path)
    recipe = load_recipe(make_recipe(tmp_path, logging={"every": 4, "wandb": {}}, train={"steps": 4}))
    train_recipe(recipe)
    assert (recipe.run.dir / "metrics.jsonl").exists()
    assert not (recipe.run.dir / "wandb").exists() and not (tmp_path / "wandb-dir").exists()


def test_wandb_from_the_environment_gets_steps_and_eval_results_before_it_closes(monkeypatch, tmp_path, make_recipe):
    from accelerate.tracking import WandBTracker

    no_wandb_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "lctk-test")
    events = []
    for method in ("start", "log", "log_table", "finish"):
        real = getattr(WandBTracker, method)

        def record(self, *args, _real=real, _method=method, **kwargs):
            keys = sorted(args[0]) if _method == "log" else [self.run_name] if _method == "start" else []
            events.append((_method, keys))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(WandBTracker, method, record)
    recipe = load_recipe(make_recipe(tmp_path, logging={"every": 2, "wandb": {}}, train={"steps": 4}))
    train_recipe(recipe)
    assert events[0] == ("start", ["lctk-test"]) and events[-1] == ("finish", [])
    logged = [keys for method, keys in events if method == "log"]
    assert "train/loss" in logged[0] and len(logged) == 3  # steps 2 and 4, then the results
    assert "eval/after/held_out_loss" in logged[-1] and "eval/train/steps" in logged[-1]
    assert list((recipe.run.dir / "wandb").glob("offline-run-*"))


def run_cli(tmp_path, *args, **environment) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), **environment)
    return subprocess.run([sys.executable, "-m", "lctk.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


@pytest.mark.parametrize(
    ("logging", "environment", "message"),
    [
        ({"wandb": {}}, {"WANDB_MODE": "online"}, "error: logging.wandb.mode: online needs a wandb key"),
        ({"wandb": {"mode": "online"}}, {}, "error: logging.wandb.mode: online needs a wandb key"),
        ({"trackers": ["tensorboard"]}, {}, "error: logging: the tensorboard tracker needs its package"),
        ({"trackers": ["nope"]}, {}, "error: logging.trackers: unknown tracker 'nope'"),
        ({"wandb": {}}, {"WANDB_MODE": "sometimes"}, "error: WANDB_MODE: 'sometimes' is not one of"),
    ],
)
def test_tracker_problems_are_one_line_before_any_work(tmp_path, make_recipe, logging, environment, message):
    if "tensorboard" in logging.get("trackers", []) and __import__("importlib").util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed")
    path = make_recipe(tmp_path, logging=logging)
    result = run_cli(tmp_path, "train", path, **environment)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message)
    assert not (tmp_path / "runs").exists()
