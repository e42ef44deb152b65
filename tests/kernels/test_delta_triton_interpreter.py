"""The delta-rule Triton kernels checked on this CPU: interpreted_delta_checks.py in a fresh process under Triton's
interpreter (it must be on before triton is imported), and the benchmark's smoke mode."""

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
@pytest.mark.parametrize("selection", ["channel or half", "not (channel or half)"])
def test_kernels_under_the_interpreter(selection):
    done = _interpreted(["-m", "pytest", "-p", "no:cacheprovider", "-k", selection, "interpreted_delta_checks.py"])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
