from pathlib import Path

import typer

from lctk.errors import UserError


def distill(recipe: Path = typer.Argument(..., help="YAML recipe")) -> None:
    """Distil a transformer into a hybrid, stage by stage (not built yet)."""
    raise UserError("`lctk distill` is not built yet")
