"""Run folders: run.name is a plain name, lctk writes only into new, empty or its own (marked) folders and deletes only
inside its own, a run folder is locked while a run uses it, and --resume is checked before anything is written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from accelerate.state import AcceleratorState

from lctk.errors import UserError
from lctk.recipe import load_recipe
from lctk.train import rundir
from lctk.train.run import train_recipe

HOLD_LOCK = """
import sys, time
from pathlib import Path
from lctk.train import rundir
with rundir.claim(Path(sys.argv[1]), "train", "holder", "run.name"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def train(recipe_path, **options):
    return train_recipe(load_recipe(recipe_path, kind="train"), **options)


def user_files(folder, *names):
    """Make a folder as a user would, holding files with the names lctk's runs use (and `names`); returns its listing."""
    (folder / "eval").mkdir(parents=True)
    (folder / "eval" / "notes.txt").write_text("mine")
    for name in ("results.json", "metrics.jsonl", *names):
        (folder / name).write_text("mine\n")
    return listing(folder)


def listing(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "a/b", ".."])
def test_run_name_must_be_a_plain_name(tmp_path, make_recipe, name):
    recipe = make_recipe(tmp_path, "plain", run={"name": name})
    with pytest.raises(UserError, match=r"^run\.name: must be a plain folder name"):
        load_recipe(recipe)


def test_a_run_name_too_long_for_a_folder_fails_at_load(tmp_path, make_recipe):
    with pytest.raises(UserError, match=r"^run\.name: is 300 bytes long; a folder name may have at most 255$"):
        load_recipe(make_recipe(tmp_path, "long", run={"name": "n" * 300}))


def test_a_fresh_run_into_a_folder_lctk_did_not_make_is_refused(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, "user", train={"steps": 2})
    folder = tmp_path / "runs" / "user"
    before = user_files(folder)
    with pytest.raises(UserError, match=r"run\.output_dir: .* already exists and was not made by lctk \(no \.lctk-run"):
        train(recipe)
    assert listing(folder) == before
    assert (folder / "metrics.jsonl").read_text() == "mine\n"


def test_overwrite_deletes_only_a_folder_lctk_made(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, "user", train={"steps": 2})
    folder = tmp_path / "runs" / "user"
    before = user_files(folder, "final")
    with pytest.raises(UserError, match=r"^--overwrite: .* was not made by lctk"):
        train(recipe, overwrite=True)
    assert listing(folder) == before


def test_an_lctk_run_is_marked_unlocked_when_done_and_overwritten_on_request(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, "mine", train={"steps": 2}, checkpoint={"every": 1})
    folder = tmp_path / "runs" / "mine"
    train(recipe)
    assert rundir.marker(folder)["kind"] == "train" and not (folder / rundir.LOCK).exists()
    with pytest.raises(UserError, match="already holds a run"):
        train(recipe)
    (folder / "checkpoints" / "step-00000001").rename(folder / "stray")  # anything in lctk's folder goes
    train(recipe, overwrite=True)
    assert not (folder / "stray").exists() and (folder / "final" / "config.json").is_file()
    assert rundir.marker(folder)["kind"] == "train"


def test_resume_from_a_missing_checkpoint_fails_before_anything_is_written(tmp_path, make_recipe):
    recipe = make_recipe(tmp_path, "nope", train={"steps": 2})
    with pytest.raises(UserError, match=r"^--resume: checkpoint folder .*nope-checkpoint not found$"):
        train(recipe, resume=str(tmp_path / "nope-checkpoint"))
    assert not (tmp_path / "runs" / "nope").exists()


def test_a_locked_folder_is_refused_naming_the_run_and_a_dead_runs_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError) as error, rundir.claim(folder, "train", "second", "run.name"):
            pass
        assert f"in use by another lctk run (pid {holder.pid} on host {socket.gethostname()}" in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((folder / rundir.LOCK).read_text())["pid"] == holder.pid  # left behind by the killed run
    with rundir.claim(folder, "train", "second", "run.name"):
        assert json.loads((folder / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert not (folder / rundir.LOCK).exists()


def test_a_lock_file_naming_a_live_process_is_respected(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / rundir.LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))
    with pytest.raises(UserError, match=rf"pid {os.getppid()} on host"), rundir.claim(folder, "train", "x", "run.name"):
        pass
    (folder / rundir.LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(UserError, match=r"on host elsewhere.*if that run is gone, remove .*\.lctk-lock"):
        with rundir.claim(folder, "train", "x", "run.name"):
            pass


def test_a_folder_of_another_kind_or_a_file_is_refused(tmp_path):
    with rundir.claim(tmp_path / "run", "distill", "d", "run.name"):
        pass
    with pytest.raises(UserError, match="holds an lctk distill run, not a train run"):
        rundir.check_folder(tmp_path / "run", "train", "run.name")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a run folder"):
        rundir.check_folder(tmp_path / "file", "extend", "run.output_dir")
    with pytest.raises(UserError, match=r"^run\.output_dir: cannot create .*file/run \(Not a directory\)$"):
        with rundir.claim(tmp_path / "file" / "run", "extend", "e", "run.output_dir"):
            pass


def test_a_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match=r"^run\.output_dir: cannot create .*file/run: .*file is a file, not a folder$"):
        rundir.check_folder(tmp_path / "file" / "run", "train", "run.output_dir")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(UserError, match=r"^run\.output_dir: cannot create .*link: it is a link to .*nowhere, which does"):
        rundir.check_folder(tmp_path / "link", "train", "run.output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "link"]


def test_a_file_where_the_run_keeps_a_folder_is_refused_before_any_write(tmp_path):
    with rundir.claim(tmp_path / "run", "train", "t", "run.name"):
        (tmp_path / "run" / "checkpoints").write_text("mine")
    with pytest.raises(UserError, match=r"^run\.name: .*run/checkpoints is a file where the run keeps its checkpoints"):
        rundir.check_folder(tmp_path / "run", "train", "run.name", resuming=True, folders=("final", "checkpoints"))
    assert (tmp_path / "run" / "checkpoints").read_text() == "mine"


def test_a_damaged_record_of_a_finished_step_is_redone_not_a_traceback(tmp_path, capsys):
    for damaged in (b"\xff\xfe", b"[1]", b"{"):
        (tmp_path / "evidence.json").write_bytes(damaged)
        assert rundir.saved_record(tmp_path / "evidence.json") is None
        assert "evidence.json is damaged; what it records is done again" in capsys.readouterr().out
    assert rundir.saved_record(tmp_path / "missing.json") is None and not capsys.readouterr().out
    (tmp_path / "evidence.json").write_text('{"top1": 0.5}')
    assert rundir.saved_record(tmp_path / "evidence.json") == {"top1": 0.5}


def test_a_run_from_before_markers_may_be_resumed_not_deleted(tmp_path):
    legacy = tmp_path / "run"
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "recipe.yaml").write_text("run: {name: run}\n")
    rundir.check_folder(legacy, "train", "run.name", holds_run=True, resuming=True)
    with pytest.raises(UserError, match="already holds a run; pass --resume auto"):
        rundir.check_folder(legacy, "train", "run.name", holds_run=True)
    with pytest.raises(UserError, match="^--overwrite: .* was not made by lctk"):
        rundir.check_folder(legacy, "train", "run.name", holds_run=True, overwrite=True)
    (legacy / "recipe.yaml").unlink()  # without its recipe it is not recognisably lctk's
    with pytest.raises(UserError, match="was not made by lctk"):
        rundir.check_folder(legacy, "train", "run.name", holds_run=True, resuming=True)
