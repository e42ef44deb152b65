"""Safe writes (lctk.files) and the one translation of a filesystem failure (lctk.errors): a failed write leaves the
old file or folder whole and no temporary behind, and ends in one line naming the path and the cause, whichever
writer met it (Python, torch, safetensors)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from disk_faults import failing_writes, file_size_limit, leftovers, unwritable

from lctk import files
from lctk.errors import UserError, filesystem_fault, os_error_line, os_error_of


def test_atomic_file_keeps_the_old_file_and_no_temporary_when_the_disk_fills(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(UserError) as error, failing_writes(monkeypatch, tmp_path, allowed=3):
        with files.atomic_file(target) as out:
            out.write("new content that does not fit")
    assert str(error.value) == f"no space left on device writing {target}"
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(ValueError, match="not a disk fault"), files.atomic_file(target) as out:
        out.write("half")
        raise ValueError("not a disk fault")  # propagates as it is, once the temporary is gone
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]
    with files.atomic_file(target) as out:
        out.write("new")
    assert target.read_text() == "new" and sorted(tmp_path.iterdir()) == [target]
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the usual permissions, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_scratch_folder_is_removed_on_failure_and_names_what_was_being_written(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(UserError) as error, failing_writes(monkeypatch, tmp_path, allowed=10):
        with files.scratch_folder(tmp_path / "final.tmp", final) as folder:
            (folder / "config.json").write_text("{}")
            (folder / "weights").write_text("more than ten bytes")
    assert str(error.value) == f"no space left on device writing {final} (weights)"
    assert (final / "weights").read_text() == "old" and leftovers(tmp_path) == []
    with files.scratch_folder(tmp_path / "final.tmp", final) as folder:
        (folder / "weights").write_text("new")
    assert (final / "weights").read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["injected", "file size limit"])
def test_torch_and_safetensors_writes_fail_with_their_os_error(tmp_path, monkeypatch, fault):
    """torch.save given a path reports a full disk as RuntimeError("... unexpected pos ...") and safetensors as a
    SafetensorError; through lctk.files both are the OSError, so the line says what happened."""
    state = {"weight": torch.randn(64, 256)}
    if fault == "injected":
        with failing_writes(monkeypatch, tmp_path, allowed=1000), pytest.raises(OSError) as error:
            files.save_torch(state, tmp_path / "optimizer.pt")
        assert error.value.errno == errno.ENOSPC
    else:
        with file_size_limit(4096):
            with pytest.raises(OSError) as error:
                files.save_torch(state, tmp_path / "optimizer.pt")
            with pytest.raises(OSError) as from_rust:
                files.save_safetensors(state, tmp_path / "model.safetensors")
            with pytest.raises(RuntimeError) as plain:  # what the checkpoint code met before
                torch.save(state, tmp_path / "plain.pt")
        assert error.value.errno == from_rust.value.errno == errno.EFBIG
        assert os_error_line(from_rust.value) == f"file too large writing {tmp_path / 'model.safetensors'}"
        assert "unexpected pos" in str(plain.value) and os_error_of(plain.value) is None


def test_os_errors_become_one_line_naming_the_cause_and_the_path(tmp_path):
    def raised_while_handling(inner: OSError) -> RuntimeError:
        try:
            try:
                raise inner
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        except RuntimeError as error:
            return error

    path = str(tmp_path / "x")
    cases = {
        OSError(errno.ENOSPC, "No space left on device", path): f"no space left on device writing {path}",
        OSError(errno.EDQUOT, "Disk quota exceeded", path): f"disk quota exceeded writing {path}",
        OSError(errno.EROFS, "Read-only file system", path): f"read-only file system writing {path}",
        PermissionError(errno.EACCES, "Permission denied", path): f"permission denied at {path}",
        OSError(errno.EIO, "Input/output error", path): f"input/output error at {path}",
    }
    for error, line in cases.items():
        assert os_error_line(filesystem_fault(error)) == line
    wrapped = RuntimeError("unexpected pos")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", path)
    assert os_error_line(os_error_of(wrapped)) == f"no space left on device writing {path}"
    assert os_error_of(raised_while_handling(OSError(errno.EIO, "x"))) is None  # `from None`: not its cause
    rust = type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: Quota (os error 122)")
    assert os_error_line(os_error_of(rust), tmp_path / "final") == f"disk quota exceeded writing {tmp_path / 'final'}"
    assert filesystem_fault(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) is None
    assert filesystem_fault(ValueError("bad")) is None


def test_free_space_is_checked_before_a_write_of_known_size(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 1_200_000)
    with pytest.raises(UserError) as error:
        files.check_space(tmp_path / "checkpoints", 3_300_000, "runs/x/checkpoints/step-00000006")
    assert str(error.value) == (f"no space left on device writing runs/x/checkpoints/step-00000006: ~3.3 MB needed, "
                                f"1.2 MB free in {tmp_path}")
    files.check_space(tmp_path, 100_000, "small")


@pytest.mark.parametrize("read_only", [False, True])
def test_an_unwritable_folder_is_named_with_its_cause(tmp_path, monkeypatch, read_only):
    cause = "read-only file system" if read_only else "permission denied"
    with unwritable(monkeypatch, tmp_path, read_only=read_only):
        with pytest.raises(UserError, match=rf"^run.name: cannot write in {tmp_path} \({cause}\)$"):
            files.check_writable(tmp_path, "run.name")
        with pytest.raises(UserError, match=rf"^--output: cannot create {tmp_path}/a/b: {tmp_path} is not writable \({cause}\)$"):
            files.check_writable(tmp_path / "a" / "b", "--output")
    files.check_writable(tmp_path / "a" / "b", "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in any folder whatever its permissions")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match=r"cannot create .*locked/run: .*locked is not writable \(permission denied\)"):
        files.check_writable(locked / "run", "run.name")


def test_what_a_killed_writer_left_is_removed_by_the_next_write_and_only_that(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    left = tmp_path / f".results.json.{host}.{dead.stdout.strip()}.1234abcd.tmp"  # a writer killed mid-write
    alive = tmp_path / f".results.json.{host}.{os.getppid()}.1234abcd.tmp"  # one still writing
    elsewhere = tmp_path / f".results.json.other-host.{dead.stdout.strip()}.1234abcd.tmp"  # not ours to judge
    for path in (left, alive, elsewhere):
        path.write_text("partial")
    with files.atomic_file(tmp_path / "results.json") as out:
        out.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name, "results.json"])
