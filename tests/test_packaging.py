"""The repository root on sys.path (python -m, pytest, notebooks) never shadows an installed package, and a wheel holds
everything the editable install maps. transformers imports the Hugging Face `kernels` package by that name, and a
regular package at the root called `kernels` once broke every import of transformers from the repo root."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"lctk": "lctk", "lctk/kernels": "kernels", "lctk/evals": "evals"}  # pyproject's package-dir


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return {**env, **extra}


def run(args, cwd, **env):
    return subprocess.run(args, cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=300)


def importable_names(folder: Path) -> set[str]:
    """Names a folder on sys.path makes importable as regular packages or modules (namespace folders never win
    over an installed package, so they cannot shadow one)."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def folders_on_sys_path() -> list[Path]:
    """The repo root (python -m, notebooks) and every test folder pytest's rootdir-less import mode prepends."""
    return [ROOT] + [d for d in [ROOT / "tests", *(ROOT / "tests").rglob("*")]
                     if d.is_dir() and d.name != "__pycache__" and not (d / "__init__.py").exists()]


def test_no_repo_folder_shadows_an_installed_or_standard_module():
    others = {name for name, dists in importlib.metadata.packages_distributions().items() if set(dists) != {"lctk"}}
    installed = others | set(sys.stdlib_module_names)
    clashes = {str(folder.relative_to(ROOT) / name): name for folder in folders_on_sys_path()
               for name in importable_names(folder) & installed}
    assert clashes == {}, f"repo folders that shadow installed modules: {clashes}"
    for folder in ("kernels", "evals"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/ must stay a namespace folder"


def test_python_dash_m_from_the_repo_root_works():
    done = run([sys.executable, "-m", "lctk.cli", "--version"], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("lctk ")


def test_transformers_then_lctk_import_at_the_repo_root():
    code = ("from transformers import PreTrainedModel\nimport importlib.util, lctk, lctk.kernels.ssd, lctk.evals.api\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(lctk.kernels.ssd.__file__, spec.origin if spec else '-', sep='\\n')")
    done = run([sys.executable, "-c", code], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    ssd_file, kernels_origin = done.stdout.split()
    assert Path(ssd_file).resolve().is_relative_to(ROOT / "kernels")
    if kernels_origin != "-":  # the Hugging Face package is installed: it must be the one found
        assert not Path(kernels_origin).resolve().is_relative_to(ROOT / "kernels")


@pytest.mark.parametrize("name", ["kernels", "evals", "recipes", "tests", "docs"])
def test_an_installed_package_wins_over_the_repo_folder_of_its_name(tmp_path, name):
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("WHERE = 'installed'\n")
    code = f"import {name}; print({name}.WHERE)"
    done = run([sys.executable, "-c", code], cwd=ROOT, PYTHONPATH=str(tmp_path))  # after the root on sys.path
    assert done.returncode == 0 and done.stdout.strip() == "installed", done.stderr[-2000:]


@pytest.mark.slow
def test_a_wheel_holds_every_mapped_package_and_runs_outside_the_repo(tmp_path):
    source = tmp_path / "src"
    for name in ("pyproject.toml", "setup.py", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    expected = set()
    for target, folder in MAPPED.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder)
            (source / folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (source / folder / relative).write_bytes(path.read_bytes())
            expected.add(f"{target}/{relative.as_posix()}")
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lctk-*.whl")
    held = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert expected - held == set(), f"missing from the wheel: {sorted(expected - held)[:10]}"
    assert not any(name.startswith(("kernels/", "evals/")) for name in held), "nothing installs as top-level"

    site = tmp_path / "site"
    installed = run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                     str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    code = "import lctk, lctk.kernels.ssd, lctk.evals.api; print(lctk.kernels.ssd.__file__, lctk.evals.api.__file__)"
    imported = run([sys.executable, "-c", code], cwd=tmp_path, PYTHONPATH=str(site))
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert all(Path(f).is_relative_to(site / "lctk") for f in imported.stdout.split())
    version = run([str(site / "bin" / "lctk"), "--version"], cwd=tmp_path, PYTHONPATH=str(site))
    assert version.returncode == 0 and version.stdout.strip() == "lctk 0.1.0", version.stderr[-2000:]
