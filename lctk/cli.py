"""The `lctk` command line: train, distill, extend, eval, serve (+ env). Each command lives with its concern
(`lctk/<concern>/command.py`, `evals/command.py`); this file only assembles them and turns every usage error,
UserError and filesystem failure (a full disk, a read-only or unwritable folder, an I/O error, wherever it happens:
lctk.errors.filesystem_fault) into one line `error: ...` with exit code 2."""

from __future__ import annotations

import sys

import typer

from lctk.distill.command import distill
from lctk.errors import UserError, filesystem_fault, os_error_line
from lctk.evals.command import eval_command
from lctk.extend.command import extend
from lctk.serving.command import CONTEXT as SERVE_CONTEXT
from lctk.serving.command import serve
from lctk.train.command import train

try:  # typer 0.2x carries its own copy of click, whose exceptions it does not re-export
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

app = typer.Typer(
    name="lctk",
    help="Train, distil, extend and evaluate long-context hybrid language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("train")(train)
app.command("distill")(distill)
app.command("extend")(extend)
app.command("eval")(eval_command)
app.command("serve", context_settings=SERVE_CONTEXT)(serve)


def _print_version(value: bool) -> None:
    if value:
        import lctk

        typer.echo(f"lctk {lctk.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="print the version"),
) -> None:
    """Train, distil, extend and evaluate long-context hybrid language models."""


@app.command("env")
def env() -> None:
    """Print what a bug report needs: versions, CUDA, the device and the kernel backend lctk would use."""
    for name, value in environment().items():
        typer.echo(f"{name + ':':<16}{value}")


app.command("info", hidden=True)(env)  # the older name


def environment() -> dict[str, str]:
    import platform
    from importlib import metadata

    import torch

    from lctk.kernels.ssd import backend_for

    found = {}
    for package in ("lctk", "torch", "transformers", "accelerate", "triton", "flash-attn", "lm-eval", "wandb"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        backend = backend_for(torch.empty(0, device=device))
    except ValueError as error:  # a bad LCTK_KERNELS
        backend = f"none ({error})"
    return {
        **found,
        "python": f"{platform.python_version()} ({platform.platform()})",
        "cuda": f"{torch.version.cuda} (available: {torch.cuda.is_available()})" if torch.version.cuda else "none",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "kernel backend": f"{backend} (LCTK_KERNELS={__import__('os').environ.get('LCTK_KERNELS', 'auto')})",
    }


def main() -> None:
    """Entry point: usage errors (an unknown flag, a missing argument), UserError and failed writes are one line and
    exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="lctk", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as error:
        typer.echo(error.ctx.get_help())
        sys.exit(0)
    except click_errors.UsageError as error:
        hint = f" (see lctk {error.ctx.info_name} --help)" if error.ctx and error.ctx.parent else " (see lctk --help)"
        typer.echo(f"error: {error.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except Exception as error:
        fault = filesystem_fault(error)
        if fault is None:  # a bug: its traceback is what a report needs
            raise
        typer.echo(f"error: {os_error_line(fault)}", err=True)
        sys.exit(UserError.exit_code)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
