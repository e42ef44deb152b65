"""`lctk train RECIPE [--set key=value ...] [--resume auto|PATH] [--overwrite]`."""

from __future__ import annotations

from pathlib import Path

import typer

from lctk.models.loading import TRUST_REMOTE_CODE_HELP

PRINT_CONFIG_HELP = "print the resolved recipe (defaults filled in) and exit without writing anything"


def train(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key: --set train.steps=100 (repeatable)"),
    resume: str = typer.Option(None, "--resume", help="'auto' (latest valid checkpoint of the run) or a checkpoint folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run of the same name first"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
) -> None:
    """Train a hybrid model from a YAML recipe."""
    from lctk.models.loading import trusting_remote_code
    from lctk.recipe import load_recipe
    from lctk.train.run import train_recipe
    from lctk.train.tracking import check_trackers

    loaded = load_recipe(recipe, overrides, kind="train")
    if print_config:
        typer.echo(loaded.to_yaml(), nl=False)
        return
    check_trackers(loaded.logging)  # before any work: an online wandb run without a key is one line
    with trusting_remote_code(trust_remote_code):  # model.init_from
        train_recipe(loaded, resume=resume, overwrite=overwrite)
