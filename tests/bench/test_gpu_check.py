"""`make gpu-check` (lctk/bench/gpu.py) dry-run at toy sizes on this CPU, so that the one-call GPU script cannot rot
between the rare sessions that have a GPU: every step runs and leaves its figures in one JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_the_dry_run_runs_every_step_and_writes_one_json(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # ~80 s on an idle 2-core box; the budget is the card's 10-minute window, generous here so that a loaded
    # machine (a step took 3x longer beside a training run) does not hit a step's share of it
    done = subprocess.run([sys.executable, "-m", "lctk.bench.gpu", "--dry-run", "--out", str(tmp_path), "--budget", "1200"],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["kernel-tests", "ssd-bench", "delta-bench", "train", "distill", "memory", "packed",
                          "decode"]
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "ok"), \
        {name: step["output_tail"][-500:] for name, step in steps.items()}
    # the Triton kernels (interpreted here) against the torch reference
    errors = steps["ssd-bench"]["figures"]["checks"][0]["max_rel_error_vs_torch"]
    assert set(errors) == {"o", "dq", "dk", "dv", "dg"} and max(errors.values()) < 1e-4
    checks = steps["delta-bench"]["figures"]["checks"]  # scalar and per-channel decay
    assert len(checks) == 2 and all(max(c["max_rel_error_vs_torch"].values()) < 1e-4 for c in checks)
    assert {r["method"] for r in steps["delta-bench"]["figures"]["results"]} == {"triton", "torch"}
    for row in steps["train"]["figures"]["results"]:
        assert row["hybrid"]["tokens_per_s"] > 0 and row["llama"]["tokens_per_s"] > 0
        assert row["hybrid_over_llama"] == pytest.approx(row["hybrid"]["tokens_per_s"] / row["llama"]["tokens_per_s"],
                                                         rel=1e-2)
    distill = steps["distill"]["figures"]  # the toy teacher: 1 and 2 of 4 layers for the recipe's 8 and 15 of 30
    assert [(r["step"], r["replaced"]) for r in distill["results"]] == [("align", 4), ("kd", 1), ("plain", 1),
                                                                        ("kd", 2), ("plain", 2)]
    for kd, plain in zip(distill["results"][1::2], distill["results"][2::2]):
        assert kd["kd_over_plain"] == pytest.approx(kd["tokens_per_s"] / plain["tokens_per_s"], rel=1e-2)
    rates = {(r["step"], r["replaced"]): r["tokens_per_s"] for r in distill["results"]}
    plan = distill["recipe"]  # the recipe's training time from the measured rates
    expected = plan["tokens_per_step"] * (plan["align_steps"] / rates["align", 4] + plan["stage_steps"][0] / rates["kd", 1]
                                          + plan["stage_steps"][1] / rates["kd", 2])
    assert plan["training_s"] == pytest.approx(expected, rel=1e-2)
    assert plan["tokens_per_parameter"] == pytest.approx(plan["tokens"] / 134_515_008, abs=1e-4)  # SmolLM2-135M
    assert steps["memory"]["figures"]
    assert all(figures["peak"] >= 0 for figures in steps["packed"]["figures"].values())
    decode = steps["decode"]["figures"]
    assert decode["check"]["max_abs_diff"] <= 1e-4 * max(1.0, decode["check"]["max_abs_logit"])
    for row in decode["results"]:
        assert row["eager"]["step_s"] > 0 and row["compiled"]["step_s"] > 0 and row["roofline_s"] > 0
    counts = steps["kernel-tests"]["figures"]
    if report["device"] == "cpu":  # the GPU kernel tests need CUDA
        assert counts.get("skipped", 0) > 0 and "passed" not in counts and "failed" not in counts
