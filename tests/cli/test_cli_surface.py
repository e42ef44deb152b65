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


def test_version_short_help_and_shell_completion():
    import lctk

    assert run_cli("--version").stdout.strip() == f"lctk {lctk.__version__}"
    short = run_cli("-h")
    assert short.returncode == 0 and "train" in short.stdout and "--show-completion" in short.stdout
    assert run_cli("eval", "-h").returncode == 0


def test_bad_flags_and_missing_arguments_are_one_line():
    for args, message in ((("train", "--bogus", "x"), "error: No such option: --bogus (see lctk train --help)"),
                          (("train",), "error: Missing argument 'recipe'"),
                          (("eval", "--model", "m", "--limit", "ten"), "error: Invalid value for '--limit'")):
        result = run_cli(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(message)


def test_env_names_versions_device_and_kernel_backend():
    result = run_cli("env")
    assert result.returncode == 0
    for field in ("torch:", "transformers:", "accelerate:", "triton:", "flash-attn:", "cuda:", "device:", "kernel backend:"):
        assert field in result.stdout
    assert run_cli("info").stdout == result.stdout  # the older name


def test_print_config_prints_the_resolved_recipe_and_writes_nothing(tmp_path):
    import yaml

    recipes = __import__("pathlib").Path(__file__).parents[2] / "recipes"
    for args in (("train", recipes / "quickstart.yaml", "--set", "train.steps=7"),
                 ("distill", recipes / "distill-smollm2.yaml"),
                 ("extend", "--model", "some/where", "--method", "yarn", "--factor", "2")):
        result = subprocess.run([sys.executable, "-m", "lctk.cli", *map(str, args), "--print-config"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        printed = yaml.safe_load(result.stdout)
        assert printed["kind"] == args[0] and "checkpoint" in printed and "logging" in printed  # defaults filled in
    assert printed["extend"]["rope"]["method"] == "yarn"
    assert list(tmp_path.iterdir()) == []
