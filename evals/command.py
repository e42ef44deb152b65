import typer

from lctk.errors import UserError


def eval_command(model: str = typer.Option(..., "--model", help="model path(s), comma separated")) -> None:
    """Run evaluation suites on any Hugging Face causal LM (not built yet)."""
    raise UserError("`lctk eval` is not built yet")
