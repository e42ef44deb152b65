from pathlib import Path

import typer

from lctk.errors import UserError


def train(recipe: Path = typer.Argument(..., help="YAML recipe")) -> None:
    """Train a hybrid model from a YAML recipe (not built yet)."""
    raise UserError("`lctk train` is not built yet")
