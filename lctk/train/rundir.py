"""Run folders: which ones lctk may write into and delete, and which run is using one (train, distill, extend).

    <run dir>/.lctk-run     marker, JSON {kind, created, name}: written when a run starts in a new or empty folder
    <run dir>/.lctk-lock    lock, JSON {host, pid, started}: present while a run uses the folder

`RunFolder` is how train, distill and extend open theirs: `check()` before any work, then `with opened():` around
the run claims the folder (marker, lock), checks it again (another run may have used it meanwhile), clears what the
start needs cleared and writes recipe.yaml; the lock is held until the block ends.

Rules:
- A run writes only into a folder that is new, empty, or marked as an lctk run of the same kind (an unmarked folder
  holding a run from before markers existed may still be resumed). Any other folder is refused before anything is
  written, so lctk never mixes its files with a user's; so is a folder this user cannot write in (no permission, a
  read-only filesystem).
- lctk deletes only inside marked folders: `--overwrite` empties one (keeping the marker and the lock), and a fresh
  train run clears the metrics, results and evals of a marked run that was killed before its first checkpoint.
- The lock is taken (main process only) before anything in the folder is deleted or written, and held until the run
  ends. A second run gets one error line naming the first (host, pid). The lock file is also flock()ed, so a run that
  died leaves no held lock: a lock naming a dead process on this host is stale and taken over; one naming another host
  is refused (its process cannot be checked from here) and the message says which file to remove.
- `check_same_recipe` compares the sections a continued run cannot change with the run's saved recipe.yaml.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lctk.errors import UserError, check_creatable
from lctk.files import atomic_file, check_writable

MARKER = ".lctk-run"
LOCK = ".lctk-lock"
OWN_FILES = (MARKER, LOCK)


@dataclass
class RunFolder:
    """The folder of a `kind` run of `recipe` (recipe.run names it; see the module docstring). resuming: the run
    continues what the folder holds (its `fixed_sections` must then match the saved recipe.yaml); overwrite: empty it
    first; holds_run: whether the folder holds a run already (a fresh start then needs --overwrite); folders: the
    names the run keeps folders under; left_by_a_killed_run: what a fresh start clears of a run killed early."""

    recipe: Any
    kind: str
    resuming: bool
    overwrite: bool = False
    holds_run: Callable[[Path], bool] = lambda folder: False
    folders: Iterable[str] = ()
    fixed_sections: Iterable[str] = ()
    left_by_a_killed_run: Iterable[str] = ()

    @property
    def path(self) -> Path:
        return self.recipe.run.dir

    @property
    def where(self) -> str:
        return key_of(self.recipe.run)

    def check(self) -> None:
        """Everything about the folder that can be checked before anything is written."""
        check_folder(self.path, self.kind, self.where, holds_run=self.holds_run(self.path), resuming=self.resuming,
                     overwrite=self.overwrite, folders=self.folders)
        if self.resuming:
            check_same_recipe(self.path, self.recipe, self.fixed_sections)

    @contextlib.contextmanager
    def opened(self) -> Iterator[Path]:
        """Claim the folder, check it again, clear it (--overwrite, or a fresh start's leftovers), write recipe.yaml;
        held until the block ends."""
        with claim(self.path, self.kind, self.recipe.run.name, self.where):
            self.check()  # again: another run may have used it meanwhile
            if self.overwrite:
                clear(self.path)
            elif not self.resuming and self.left_by_a_killed_run:
                clear(self.path, self.left_by_a_killed_run)
            with atomic_file(self.path / "recipe.yaml") as out:
                out.write(self.recipe.to_yaml())
            yield self.path


def key_of(run) -> str:
    """The recipe key that names a run's folder (a RunSection's), for messages."""
    return "run.output_dir" if run.output_dir else "run.name"


def marker(folder: Path) -> dict | None:
    """The marker's content ({} when unreadable), or None when `folder` is not marked as an lctk run folder."""
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def check_folder(folder: Path, kind: str, where: str, *, holds_run: bool = False, resuming: bool = False,
                 overwrite: bool = False, folders: Iterable[str] = ()) -> None:
    """Before anything is written: may a `kind` run use `folder`? holds_run: it holds a run (a fresh start then needs
    --overwrite); resuming: the run continues what the folder holds; folders: the names the run keeps folders under,
    which must not be files. An unmarked folder holding a run and its recipe.yaml is an lctk run from before markers
    existed: it may be resumed, not deleted."""
    if overwrite and resuming:
        raise UserError("--overwrite: starts the run again, so it cannot go with --resume")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{where}: {folder} is a file, not a run folder")
    check_creatable(folder, where)
    check_writable(folder, where)
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    blocked = next((name for name in folders if (folder / name).exists() and not (folder / name).is_dir()), None)
    if blocked is not None and not overwrite:
        raise UserError(f"{where}: {folder / blocked} is a file where the run keeps its {blocked} folder (move it away)")
    for name in folders:
        if (folder / name).is_dir():
            check_writable(folder / name, where)
    found = marker(folder)
    if found is None:
        if overwrite:
            raise UserError(f"--overwrite: {folder} was not made by lctk (no {MARKER} file) and lctk deletes only its "
                            "own run folders; remove it yourself or choose another run.name")
        if not (holds_run and (folder / "recipe.yaml").is_file()):
            raise UserError(f"{where}: {folder} already exists and was not made by lctk (no {MARKER} file); "
                            "choose a new or empty folder")
    elif found.get("kind", kind) != kind:
        raise UserError(f"{where}: {folder} holds an lctk {found['kind']} run, not a {kind} run; choose another run.name")
    if holds_run and not resuming and not overwrite:
        raise UserError(f"{where}: {folder} already holds a run; pass --resume auto to continue it, --overwrite to start "
                        "again, or --set run.name=<new name>")


def saved_record(path: Path) -> dict | None:
    """A JSON object a run saved for a step it finished (results.json, evidence.json, importance.json); None when
    it is absent, or damaged (with a warning): the step is redone, as a damaged checkpoint is passed over."""
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        print(f"warning: {path} is damaged; what it records is done again", flush=True)
        return None
    return record


def check_same_recipe(folder: Path, recipe, sections: Iterable[str]) -> None:
    """The run in `folder` continues only with the same `sections` as its saved recipe.yaml (if it has one)."""
    saved_file = folder / "recipe.yaml"
    if not saved_file.is_file():
        return
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        raise UserError(f"{saved_file}: not a readable recipe, so the run cannot be continued; use --overwrite")
    current = recipe.model_dump(mode="json")
    for section in sections:
        key = _first_difference(saved.get(section), current.get(section), section)
        if key is not None:
            raise UserError(f"{key}: differs from the run in {folder} that this command would continue; "
                            "use --set run.name=<new name> for a new run (or --overwrite to start this one again)")


def _first_difference(saved, current, key: str) -> str | None:
    """The dotted key of the first value that differs between two YAML trees, or None."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in sorted(set(saved) | set(current)):
            found = _first_difference(saved.get(name), current.get(name), f"{key}.{name}")
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current, strict=True)):
            found = _first_difference(a, b, f"{key}.{index}")
            if found:
                return found
        return None
    return None if saved == current else key


@contextlib.contextmanager
def claim(folder: Path, kind: str, name: str, where: str) -> Iterator[None]:
    """Create `folder` (marked as a `kind` run when it is new or empty) and hold its lock until the block ends."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way, no permission, a read-only disk
        raise UserError(f"{where}: cannot create {folder} ({error.strerror})") from None
    if marker(folder) is None and not any(folder.iterdir()):
        with atomic_file(folder / MARKER) as out:
            out.write(json.dumps({"kind": kind, "created": _now(), "name": name}) + "\n")
    with _lock(folder, where):
        yield


def clear(folder: Path, names: Iterable[str] | None = None) -> None:
    """Delete `names` (default: everything but the marker and the lock) inside a folder lctk marked as its own."""
    if marker(folder) is None:
        raise UserError(f"{folder}: not deleting anything in a folder lctk did not make (no {MARKER} file)")
    paths = [folder / name for name in names] if names is not None else list(folder.iterdir())
    for path in paths:
        if path.name in OWN_FILES:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _lock(folder: Path, where: str) -> Iterator[None]:
    path = folder / LOCK
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(handle)
            os.close(handle)
            raise _in_use(folder, where, holder, path) from None
        if _same_file(handle, path):
            break
        os.close(handle)  # the previous holder removed the file between our open and flock: open the new one
    holder = _read(handle)
    if holder is not None and not _stale(holder):
        os.close(handle)
        raise _in_use(folder, where, holder, path)
    if holder is not None:
        print(f"warning: {path}: taking over the lock of pid {holder.get('pid')}, which is no longer running", flush=True)
    os.ftruncate(handle, 0)
    os.pwrite(handle, (json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}) + "\n").encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a run that opens the file after this makes a new one
        os.close(handle)


def _read(handle: int) -> dict | None:
    """The lock file's holder record; None for an empty file; {} for one that is not lctk's JSON."""
    text = os.pread(handle, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    """A holder that is certainly gone: a dead process on this host (or a record lctk did not write). We hold the
    flock here, so a record naming this very process is left from an earlier process with the same pid."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _in_use(folder: Path, where: str, holder: dict | None, path: Path) -> UserError:
    holder = holder or {}
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    here = holder.get("host") in (None, socket.gethostname())
    hint = "wait for it to end" if here else f"if that run is gone, remove {path}"
    return UserError(f"{where}: {folder} is in use by another lctk run ({who}); {hint} or choose another run.name")


def _same_file(handle: int, path: Path) -> bool:
    try:
        return os.fstat(handle).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
