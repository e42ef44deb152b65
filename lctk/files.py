"""Writing files and folders so that a failure leaves nothing behind and ends in one line naming its cause.

Every lctk output that must appear whole goes through one of two context managers:
- `atomic_file(path)`: the block writes a temporary file beside `path`, renamed over it when the block ends, so a
  reader sees the old file or the whole new one (results.json, recipe.yaml, the run marker, the corpus cache, a
  rewritten samples.jsonl);
- `scratch_folder(temporary, final)`: the same for a folder (a checkpoint, a model folder, the token store).
Either removes its temporary file or folder on any failure (Ctrl-C included). A failure the filesystem reported (a
full disk, a read-only or unwritable folder, an I/O error: lctk.errors.os_error_of) becomes one UserError line naming
the destination and the cause; anything else propagates unchanged once the temporary is gone. Writes that happen in
place (metrics.jsonl, samples.jsonl appends, plots, the lock) are translated by the command line (lctk.cli.main), so
every filesystem failure is one line whoever meets it. A process killed mid-write cannot clean up: a temporary file
(and the token store's temporary folder) is named after its host and process (`private_name`), and the next writer
removes those of processes of this host that are gone (`remove_dead_leftovers`); a checkpoint's or model folder's
fixed temporary name is reused (and so cleared) by the next writer of that folder.

Before the first write: `check_writable` (may lctk create or write in this folder?) and, where the size is known (a
checkpoint, a model, a token store with max_tokens), `check_space`. torch.save and safetensors report a failed write
as RuntimeError / SafetensorError; `save_torch` and `save_safetensors` make it the OSError it was.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from lctk.errors import UserError, os_error_line, os_error_of

SPACE_MARGIN = 1 << 20  # bytes kept free beyond an estimate: file headers, the manifest, rounding to blocks


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """An open temporary file beside `path` (created with the usual permissions), renamed over `path` when the block
    ends; removed, and the failure named, when it does not (see the module docstring)."""
    remove_dead_leftovers(path.parent, f".{path.name}")
    temporary = path.with_name(private_name(f".{path.name}", secrets.token_hex(4)))
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        _reraise(error, path)


@contextlib.contextmanager
def scratch_folder(temporary: Path, final: Path | None = None) -> Iterator[Path]:
    """A new empty folder `temporary` (whatever an earlier, killed writer left there is removed first) for the block
    to fill; moved into place as `final` when the block ends (with final=None the block moves it itself). On any
    failure it is removed and the failure named as writing `final`."""
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        yield temporary
        if final is not None:
            move_into_place(temporary, final)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        _reraise(error, final or temporary)


def private_name(prefix: str, *unique: str) -> str:
    """A temporary name no other process uses: `<prefix>.<host>.<pid>[.<unique>].tmp`."""
    return ".".join([prefix, socket.gethostname(), str(os.getpid()), *unique, "tmp"])


def remove_dead_leftovers(folder: Path, prefix: str) -> None:
    """The temporary files and folders (private_name) that processes of this host which are no longer running left
    in `folder` under `prefix`."""
    mine = f"{prefix}.{socket.gethostname()}."
    for leftover in folder.glob(f"{glob.escape(mine)}*.tmp"):
        pid = leftover.name.removeprefix(mine).split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def move_into_place(temporary: Path, final: Path) -> None:
    """Rename a finished folder to `final`, replacing what is there: the old one is renamed aside to `<final>.old`
    first and removed last, so at any moment one whole folder exists, under its own name or one of the two others."""
    aside = final.with_name(final.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        final.rename(aside)
    temporary.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def _reraise(error: BaseException, target: Path) -> None:
    fault = None if isinstance(error, UserError) else os_error_of(error)
    if fault is None:
        raise error
    raise UserError(os_error_line(fault, target)) from error


def check_space(folder: Path, needed: int, target: Path | str) -> None:
    """A one-line error, before any of it is written, when the filesystem holding `folder` has no room for `needed`
    bytes of `target`."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN:
        raise UserError(f"no space left on device writing {target}: ~{size_text(needed)} needed, "
                        f"{size_text(free)} free in {existing_parent(folder)}")


def check_writable(folder: Path, where: str) -> None:
    """lctk may create `folder` (or write in it, when it exists): a one-line error naming the folder and why not (no
    permission for this user, a read-only filesystem). Root passes permission checks, not a read-only mount."""
    existing = existing_parent(folder)
    if not existing.is_dir() or os.access(existing, os.W_OK | os.X_OK):
        return  # a file on the way is check_creatable's to report
    cause = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
    if existing == folder:
        raise UserError(f"{where}: cannot write in {folder} ({cause})")
    raise UserError(f"{where}: cannot create {folder}: {existing} is not writable ({cause})")


def free_bytes(folder: Path) -> int:
    """Bytes this user may still write on the filesystem that holds (or will hold) `folder`."""
    return shutil.disk_usage(existing_parent(folder)).free


def existing_parent(folder: Path) -> Path:
    """`folder` if it exists, else its nearest existing ancestor (where it would be created)."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def size_text(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, so that a failed write raises its OSError (torch's own file writer reports
    a full disk as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos")."""
    import torch

    failures: list[OSError] = []
    with open(path, "wb") as handle:

        def write(data) -> int:
            try:
                return handle.write(data)
            except OSError as error:
                failures.append(error)
                raise

        try:
            torch.save(obj, SimpleNamespace(write=write, flush=handle.flush))
        except RuntimeError:
            if failures:
                raise failures[0] from None
            raise


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, a failed write raised as its OSError (safetensors reports it as SafetensorError)."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as error:
        fault = os_error_of(error)
        if fault is None:
            raise
        raise OSError(fault.errno, fault.strerror, str(path)) from None
