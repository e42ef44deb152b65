"""`lctk distill RECIPE [--set key=value ...] [--resume auto] [--overwrite]`."""

from __future__ import annotations

from pathlib import Path

import typer

from lctk.models.loading import TRUST_REMOTE_CODE_HELP
from lctk.train.command import PRINT_CONFIG_HELP


def distill(
    recipe: Path = typer.Argument(..., help="YAML recipe with a distill: section, e.g. recipes/distill-smollm2.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key: --set distill.stages.0.steps=50 (repeatable)"),
    resume: str = typer.Option(None, "--resume", help="'auto': continue the run stage by stage from its checkpoints"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run of the same name first"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
) -> None:
    """Distil a transformer (Llama / Mistral / Qwen2) into a hybrid, replacing attention layers stage by stage."""
    from lctk.distill.run import distill_recipe
    from lctk.models.loading import trusting_remote_code
    from lctk.recipe import load_recipe
    from lctk.train.tracking import check_trackers

    loaded = load_recipe(recipe, overrides, kind="distill")
    if print_config:
        typer.echo(loaded.to_yaml(), nl=False)
        return
    check_trackers(loaded.logging)  # before any work: an online wandb run without a key is one line
    with trusting_remote_code(trust_remote_code):  # the teacher
        distill_recipe(loaded, resume=resume, overwrite=overwrite)
