"""`lctk serve MODEL [vllm serve options ...]`: vLLM's OpenAI-compatible server on an lctk model, started from the
serving environment (`make serve-setup` builds .venv-serve; LCTK_SERVE_VENV names another). lctk's own environment
checks the model first (config, weight files, shapes, servable pattern: one `error:` line each), then the command
becomes `.venv-serve/bin/vllm serve MODEL ...`, every further option passed on as it is. A model with `G` layers
gets `--dtype bfloat16` on a machine without CUDA unless a --dtype is given: vLLM's CPU Gated DeltaNet runs only in
bf16."""

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
    import torch

    from lctk.models.loading import open_model
    from lctk.serving.check import servable_problem

    config = open_model(model, "MODEL").config
    problem = servable_problem(config)
    if problem is not None:
        raise UserError(f"MODEL: {model}: {problem}")
    options = list(ctx.args)
    dtype_given = any(option == "--dtype" or option.startswith("--dtype=") for option in options)
    if "G" in config.pattern and not dtype_given and not torch.cuda.is_available():
        options += ["--dtype", "bfloat16"]
    vllm = serving_venv() / "bin" / "vllm"
    if not os.access(vllm, os.X_OK):
        raise UserError(f"no vLLM serving environment ({vllm} not found): run `make serve-setup` in the lctk "
                        "checkout (vLLM needs its own venv), or set LCTK_SERVE_VENV")
    os.execv(vllm, [str(vllm), "serve", model, *options])
