"""The one error type that reaches users (a single line naming the bad key, file or flag, and exit code 2), the check
every folder lctk is about to create goes through, and the one translation of a filesystem failure (a full disk, a
read-only or unwritable folder, an I/O error) into such a line."""

import errno
import io
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (recipe, path, flag, model file), or a write the filesystem refused. The CLI prints
    `error: <message>` and exits 2."""

    exit_code = 2


def check_creatable(folder: Path, where: str) -> None:
    """`folder` exists as a folder or can be made: no link to nothing in its place and no file on its way. Checked
    before any work, so a typo fails in seconds rather than when the first file is written."""
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{where}: cannot create {folder}: it is a link to {os.readlink(folder)}, which does not exist")
    blocked = next((parent for parent in folder.parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise UserError(f"{where}: cannot create {folder}: {blocked} is a file, not a folder")


# causes that only a write can meet, so the line says "writing"
WRITE_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",  # also what a process's file-size limit (ulimit -f) gives
    errno.EROFS: "read-only file system",
}
FILESYSTEM_FAULTS = {*WRITE_FAULTS, errno.EACCES, errno.EPERM, errno.EIO}
RUST_IO_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports a failed write


def os_error_of(error: BaseException) -> OSError | None:
    """The filesystem error behind `error`, or None: `error` itself, one it was raised from or while handling (torch
    reports a write that failed under torch.save as a RuntimeError raised while handling it), or the OS error number
    in the message of a writer written in Rust (safetensors: "... I/O error: No space left on device (os error 28)")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        found = RUST_IO_ERROR.search(str(error)) if type(error).__name__ == "SafetensorError" else None
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        error = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__
    return None


def filesystem_fault(error: BaseException) -> OSError | None:
    """os_error_of, for a failure of the filesystem: one naming a file, or whose cause is one of FILESYSTEM_FAULTS
    (not, say, a refused network connection, whose traceback says more)."""
    fault = os_error_of(error)
    return fault if fault is not None and (fault.filename or fault.errno in FILESYSTEM_FAULTS) else None


def os_error_cause(error: OSError) -> str:
    """What went wrong, in words: "no space left on device", "permission denied", ..."""
    return WRITE_FAULTS.get(error.errno) or (error.strerror or type(error).__name__).lower()


def os_error_line(error: OSError, target: Path | str | None = None) -> str:
    """One line naming the path and the cause: "no space left on device writing runs/x/checkpoints/step-00000006
    (optimizer.pt)". `target`: what was being written (the line then says "writing" whatever the cause), named in
    place of the failing file, a temporary one (removed by now) beside it or within it; a file within it is named in
    brackets."""
    path = os.fspath(error.filename) if isinstance(error.filename, str | os.PathLike) else None
    path = path or _file_written_when(error)
    if target is not None:
        within = path is not None and Path(path).parent != Path(target).parent
        path = f"{target} ({Path(path).name})" if within else str(target)
    if path is None:
        return os_error_cause(error)
    writing = target is not None or error.errno in WRITE_FAULTS
    return f"{os_error_cause(error)} {'writing' if writing else 'at'} {path}"


def _file_written_when(error: OSError) -> str | None:
    """The file a failed write() went to. Python reports a full disk met by a file object's write() without the
    file's name, so the frames the error passed through are searched, innermost first, for a file object open for
    writing: the writer's own handle (`with open(path, "a") as handle: handle.write(...)`, Path.write_text, json.dump,
    an image writer)."""
    frames = []
    trace = error.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name, mode = getattr(value, "name", None), getattr(value, "mode", None)
            if isinstance(value, io.IOBase) and isinstance(name, str) and isinstance(mode, str) and set(mode) & set("wax+"):
                return name
    return None
