"""`lctk distill RECIPE [--set key=value ...] [--resume auto] [--overwrite]`."""

from __future__ import annotations

from pathlib import Path

import typer


def distill(
    recipe: Path = typer.Argument(..., help="YAML recipe with a distill: section, e.g. recipes/distill-smollm2.yaml"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key: --set distill.stages.0.steps=50 (repeatable)"),
    resume: str = typer.Option(None, "--resume", help="'auto': continue the run stage by stage from its checkpoints"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run of the same name first"),
) -> None:
    """Distil a transformer (Llama / Mistral / Qwen2) into a hybrid, replacing attention layers stage by stage."""
    from lctk.distill.run import distill_recipe
    from lctk.recipe import load_recipe

    distill_recipe(load_recipe(recipe, overrides, kind="distill"), resume=resume, overwrite=overwrite)
