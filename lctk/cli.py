"""The `lctk` command line: train, distill, extend, eval (+ info). Each command lives with its concern
(`lctk/<concern>/command.py`, `evals/command.py`); this file only assembles them and turns UserError into one line."""

from __future__ import annotations

import sys

import typer

from lctk.distill.command import distill
from lctk.errors import UserError
from lctk.evals.command import eval_command
from lctk.extend.command import extend
from lctk.train.command import train

app = typer.Typer(
    name="lctk",
    help="Train, distil, extend and evaluate long-context hybrid language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("train")(train)
app.command("distill")(distill)
app.command("extend")(extend)
app.command("eval")(eval_command)


@app.command("info")
def info() -> None:
    """Print versions and the kernel backend that would be used."""
    import torch
    import transformers

    import lctk

    typer.echo(f"lctk {lctk.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    typer.echo(f"cuda available: {torch.cuda.is_available()}")


def main() -> None:
    """Entry point. Usage errors are typer's (one line, exit 2); UserError from a command likewise."""
    try:
        app()
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
