"""Loading any Hugging Face causal LM for the evals: device and dtype flags, the model and its tokenizer (every file is
checked by lctk.models.loading before weights are read), and a short name for a model path."""

from __future__ import annotations

import os
import re

import torch

from lctk.errors import UserError
from lctk.models.loading import ModelFiles, load_causal_lm, load_tokenizer, open_model, resolve

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise UserError(f"--device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: {device} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_model(
    path: str, device: str = "auto", dtype: str = "auto", tokenizer_path: str | None = None, where: str = "--model"
):
    """(model, tokenizer) from a local folder, a .gguf file, or (online) a hub name. Errors are one-line UserErrors."""
    files, tokenizer = open_model_and_tokenizer(path, tokenizer_path, where)
    return load_weights(files, device, dtype, where), tokenizer


def open_model_and_tokenizer(path: str, tokenizer_path: str | None = None, where: str = "--model"):
    """(ModelFiles with config and checked weight files, tokenizer): everything but the weights, so that every model
    of a run can be checked before the first one is evaluated."""
    files = open_model(path, where)
    if tokenizer_path:
        return files, load_tokenizer(resolve(tokenizer_path, "--tokenizer"), "--tokenizer")
    return files, load_tokenizer(files, where, hint="pass --tokenizer FOLDER")


def load_weights(files: ModelFiles, device: str = "auto", dtype: str = "auto", where: str = "--model"):
    resolved_device = resolve_device(device)
    model = load_causal_lm(files, where, dtype=resolve_dtype(dtype, resolved_device))
    return model.to(resolved_device).eval()


def model_name(path: str) -> str:
    """A short, file-system-safe name for a model path (its last two path parts)."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    return re.sub(r"[^\w.-]+", "_", "-".join(parts[-2:]) or "model")
