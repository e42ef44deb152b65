"""The one error type that reaches users (a single line naming the bad key, file or flag, and exit code 2), and the
check every folder lctk is about to create goes through."""

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (recipe, path, flag, model file). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


def check_creatable(folder: Path, where: str) -> None:
    """`folder` exists as a folder or can be made: no link to nothing in its place and no file on its way. Checked
    before any work, so a typo fails in seconds rather than when the first file is written."""
    if folder.is_symlink() and not folder.exists():
        raise UserError(f"{where}: cannot create {folder}: it is a link to {os.readlink(folder)}, which does not exist")
    blocked = next((parent for parent in folder.parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise UserError(f"{where}: cannot create {folder}: {blocked} is a file, not a folder")
