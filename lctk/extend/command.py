from pathlib import Path

import typer

from lctk.errors import UserError


def extend(recipe: Path = typer.Argument(None, help="YAML recipe")) -> None:
    """Extend a model's usable context (not built yet)."""
    raise UserError("`lctk extend` is not built yet")
