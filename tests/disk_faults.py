"""Disk faults a test can make without root: Python-level writes under a folder that fail as on a full disk (or a
read-only one), folders lctk must treat as unwritable, and a file-size limit that makes every writer (C, C++ and Rust
ones included) fail in the kernel.

`failing_writes` replaces the lowest Python write layer (the file objects returned by open / io.open / os.fdopen,
which pathlib, json, numpy's write through a file object and lctk.files.save_torch all use), so it reaches everything
written through Python; writers that open files themselves in C++ or Rust (torch.save given a path, safetensors)
need `file_size_limit`, which makes the kernel refuse writes past a size (errno EFBIG), as a full disk does."""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import io
import os
import resource
import signal
from pathlib import Path

REAL_OPEN, REAL_FDOPEN, REAL_ACCESS, REAL_STATVFS = io.open, os.fdopen, os.access, os.statvfs
REAL_OS_OPEN, REAL_MKDIR = os.open, os.mkdir


class FailingFile:
    """A file object whose writes fail with `number` once `allowed` bytes have been written."""

    def __init__(self, handle, allowed: int, number: int):
        self._handle, self._allowed, self._number = handle, allowed, number

    def write(self, data):
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if size > self._allowed:
            self._handle.write(data[: self._allowed] if not isinstance(data, memoryview) else data.cast("B")[: self._allowed])
            self._allowed = 0
            raise OSError(self._number, os.strerror(self._number))  # as Python reports it: without the file's name
        self._allowed -= size
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


io.IOBase.register(FailingFile)  # a file object, as lctk's search for the file that failed (lctk.errors) sees it


def _path_of(target) -> str | None:
    if isinstance(target, int):
        try:
            return os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            return None
    return os.fspath(target) if isinstance(target, str | os.PathLike) else None


@contextlib.contextmanager
def failing_writes(monkeypatch, folder: Path, allowed: int = 0, number: int = errno.ENOSPC, name: str = "*"):
    """Files opened for writing under `folder` (or the file `folder` itself), whose name matches the glob `name`,
    accept `allowed` bytes each, then fail with OSError(number)."""
    root = os.path.realpath(folder)

    def wrap(opener):
        def opened(target, mode="r", *args, **kwargs):
            handle = opener(target, mode, *args, **kwargs)
            path = _path_of(target)
            writing = any(flag in mode for flag in "wax+")
            inside = path and (os.path.realpath(path) + os.sep).startswith(root + os.sep)
            if writing and inside and fnmatch.fnmatch(os.path.basename(path), name):
                return FailingFile(handle, allowed, number)
            return handle

        return opened

    with monkeypatch.context() as patch:
        patch.setattr(builtins, "open", wrap(REAL_OPEN))
        patch.setattr(io, "open", wrap(REAL_OPEN))
        patch.setattr(os, "fdopen", wrap(REAL_FDOPEN))
        yield


@contextlib.contextmanager
def unwritable(monkeypatch, folder: Path, read_only: bool = False):
    """`folder` and everything under it as a non-root user without write permission sees it (read_only: as anyone
    sees a read-only mount): os.access says no, and creating a file or folder there, or writing one, fails with
    EACCES / EROFS."""
    root = os.path.realpath(folder)
    number = errno.EROFS if read_only else errno.EACCES

    def inside(path) -> bool:
        path = _path_of(path)
        return path is not None and (os.path.realpath(path) + os.sep).startswith(root + os.sep)

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and inside(path):
            return False
        return REAL_ACCESS(path, mode, *args, **kwargs)

    def statvfs(path):
        found = REAL_STATVFS(path)
        if read_only and inside(path):
            return os.statvfs_result((*found[:8], found.f_flag | os.ST_RDONLY, *found[9:]))
        return found

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(number, os.strerror(number), os.fspath(path))
        return REAL_OS_OPEN(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(number, os.strerror(number), os.fspath(path))
        return REAL_MKDIR(path, *args, **kwargs)

    with monkeypatch.context() as patch, failing_writes(monkeypatch, folder, 0, number):
        for name, replacement in (("access", access), ("statvfs", statvfs), ("open", os_open), ("mkdir", mkdir)):
            patch.setattr(os, name, replacement)
        yield


@contextlib.contextmanager
def file_size_limit(size: int):
    """This process (and the processes it starts) may write no file past `size` bytes: the kernel fails the write
    with EFBIG (the signal it would send is ignored), whichever language the writer is in."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def limited_file_size(size: int):
    """A preexec_fn for subprocess: the started process may write no file past `size` bytes (see file_size_limit)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return limit


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders lctk's writers use (*.tmp, *.old) anywhere under `folder`."""
    return sorted(p for p in Path(folder).rglob("*") if p.name.endswith((".tmp", ".old")))
