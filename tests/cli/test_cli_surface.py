"""The command line surface: help lists the commands, and bad input ends in one line and exit code 2."""

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lctk.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_four_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "distill", "extend", "eval"):
        assert command in result.stdout


def test_unknown_command_is_a_usage_error_without_traceback():
    result = run_cli("fly")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "fly" in result.stderr
