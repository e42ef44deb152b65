"""The Triton path checked on this CPU: interpreted_ssd_checks.py in a fresh process under Triton's interpreter
(it must be on before triton is imported), and the GPU benchmark's smoke mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent


def _interpreted(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", LCTK_KERNELS="triton")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=HERE)


# two halves, so that two test workers share the work
@pytest.mark.parametrize("selection", ["fp32", "not fp32"])
def test_kernels_under_the_interpreter(selection):
    done = _interpreted(["-m", "pytest", "-p", "no:cacheprovider", "-k", selection, "interpreted_ssd_checks.py"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout


def test_gpu_benchmark_smoke_mode_runs():
    """`python -m lctk.kernels.ssd.bench --smoke`: tiny sizes, every method it can run here, a table and JSON."""
    done = _interpreted(["-m", "lctk.kernels.ssd.bench", "--smoke"])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("\n{\n") :])
    assert {r["method"] for r in report["results"]} == {"triton", "torch"}, report["skipped"]
    assert all(error < 1e-4 for error in report["checks"][0]["max_rel_error_vs_torch"].values())
