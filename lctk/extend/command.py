"""`lctk extend RECIPE [--set key=value ...] [--overwrite]` or the flag form
`lctk extend --model PATH --method yarn[,state_norm] --factor 4 [--output DIR] [--set key=value ...] [--overwrite]`.

The flag form builds the same recipe (an `extend:` section from the flags, the rest defaults), so both forms are
validated, run and reported alike; `--set` overrides any key of either, e.g. `--set extend.rope.beta_fast=16`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from lctk.errors import UserError
from lctk.models.loading import TRUST_REMOTE_CODE_HELP
from lctk.train.command import PRINT_CONFIG_HELP


def extend(
    recipe: Path | None = typer.Argument(None, help="YAML recipe (or give --model and --method instead)"),
    model: str | None = typer.Option(None, "--model", help="model folder to extend (flag form)"),
    method: list[str] = typer.Option(
        [], "--method", help="linear, dynamic, yarn, llama3, theta (RoPE) and/or dt_scale, b_scale, state_norm, "
        "state_window, calibrate_dt (Mamba-2); comma separated or repeated"
    ),
    factor: float | None = typer.Option(None, "--factor", help="new length = factor x the model's current length"),
    length: int | None = typer.Option(None, "--length", help="new length in tokens (instead of --factor)"),
    output: Path | None = typer.Option(None, "--output", help="run folder (default runs/<run.name>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="delete an existing run of the same name first (a rerun "
                                   "otherwise continues it)"),
    overrides: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set eval.limit=2 (repeatable)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP),
    print_config: bool = typer.Option(False, "--print-config", help=PRINT_CONFIG_HELP),
) -> None:
    """Extend a model's usable context: RoPE scaling, recurrent-state methods, optional training; before/after evals."""
    from lctk.extend.run import extend_recipe
    from lctk.models.loading import trusting_remote_code
    from lctk.recipe import apply_override, load_recipe, validate_recipe
    from lctk.train.tracking import check_trackers

    flags_given = model is not None or method or factor is not None or length is not None
    if recipe is not None and flags_given:
        raise UserError("give a recipe or the flags --model/--method/--factor, not both (use --set to change a recipe)")
    if recipe is not None:
        loaded = load_recipe(recipe, overrides, kind="extend")
    else:
        from lctk.extend.recipe import ExtendRecipe

        raw = recipe_from_flags(model, method, factor, length)
        for override in overrides:
            apply_override(raw, override)
        loaded = validate_recipe(raw, ExtendRecipe)
    if output is not None:
        loaded.run.output_dir, loaded.run.name = str(output), output.name
    if print_config:
        typer.echo(loaded.to_yaml(), nl=False)
        return
    check_trackers(loaded.logging)  # before any work: an online wandb run without a key is one line
    with trusting_remote_code(trust_remote_code):
        extend_recipe(loaded, log=typer.echo, overwrite=overwrite)


def recipe_from_flags(model: str | None, methods: list[str], factor: float | None, length: int | None) -> dict:
    """The recipe the flag form stands for."""
    from lctk.extend.recurrent import RECURRENT_METHODS
    from lctk.extend.rope import ROPE_METHODS

    if model is None:
        raise UserError("--model: give the model folder to extend (or a recipe)")
    names = [name.strip() for entry in methods for name in entry.split(",") if name.strip()]
    if not names:
        raise UserError(f"--method: give at least one of {', '.join(ROPE_METHODS + RECURRENT_METHODS)}")
    unknown = [name for name in names if name not in ROPE_METHODS + RECURRENT_METHODS]
    if unknown:
        raise UserError(f"--method: unknown method {unknown[0]!r}; known: {', '.join(ROPE_METHODS + RECURRENT_METHODS)}")
    rope = [name for name in names if name in ROPE_METHODS]
    if len(rope) > 1:
        raise UserError(f"--method: one RoPE method at a time, got {', '.join(rope)}")
    if factor is None and length is None:
        raise UserError("--factor: give --factor (e.g. 4) or --length (tokens)")
    section: dict = {"model": model, "factor": factor, "length": length}
    if rope:
        section["rope"] = {"method": rope[0]}
    section["recurrent"] = [{"method": name} for name in names if name in RECURRENT_METHODS]
    name = f"extend-{Path(model.rstrip('/')).name}-{'-'.join(names)}"
    return {"kind": "extend", "run": {"name": name}, "extend": section}
