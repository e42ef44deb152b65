"""`lctk serve MODEL [vllm serve options ...]`: vLLM's OpenAI-compatible server on an lctk model, started from the
serving environment (`make serve-setup` builds .venv-serve; LCTK_SERVE_VENV names another). lctk's own environment
checks the model first (config, weight files, shapes, servable pattern: one `error:` line each), then the command
becomes `.venv-serve/bin/vllm serve MODEL ...`, every further option passed on as it is."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lctk.errors import UserError

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}


def serving_venv() -> Path:
    from lctk import _CHECKOUT_ROOT

    return Path(os.environ.get("LCTK_SERVE_VENV") or _CHECKOUT_ROOT / ".venv-serve")


def serve(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="lctk model folder (config.json + model.safetensors + tokenizer)"),
) -> None:
    """Serve a model with vLLM (OpenAI-compatible API); options after MODEL go to `vllm serve` (e.g. --port 8000)."""
    from lctk.models.loading import open_model
    from lctk.serving.check import servable_problem

    problem = servable_problem(open_model(model, "MODEL").config)
    if problem is not None:
        raise UserError(f"MODEL: {model}: {problem}")
    vllm = serving_venv() / "bin" / "vllm"
    if not os.access(vllm, os.X_OK):
        raise UserError(f"no vLLM serving environment ({vllm} not found): run `make serve-setup` in the lctk "
                        "checkout (vLLM needs its own venv), or set LCTK_SERVE_VENV")
    os.execv(vllm, [str(vllm), "serve", model, *ctx.args])
