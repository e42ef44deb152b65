"""Loading a model someone hands to lctk (a folder, a .gguf file or a hub name): every failure is one UserError
naming the file and the problem, never a traceback. Used wherever lctk loads a model: `lctk eval`, `lctk extend`,
the distillation teacher and `model.init_from`.

Before any weights are read, `open_model` checks what is cheap to check: config.json is a JSON object with a
`model_type`, every safetensors file has a readable header whose tensors cover the file exactly (an empty,
truncated or random-bytes file fails here, naming the file), and the model the config describes, built on the meta
device, has the shapes the headers list (a config whose sizes do not match the weights fails before anything is
allocated). `load_causal_lm` then loads the weights and refuses a model with missing, unexpected or differently
shaped tensors instead of letting transformers initialise them at random.

Paths: a path that looks local (starts with `.`, `/` or `~`, has more than one `/`, or whose first part exists) and
is not there fails at once with "model folder not found"; only an `org/name` with nothing of it on disk goes to the
hub, and only when the hub is reachable (not HF_HUB_OFFLINE, and a TCP connection opens within a few seconds).

Remote code: every from_pretrained passes `trust_remote_code=remote_code_trusted()`, False unless a command runs
inside `trusting_remote_code(True)` (the `--trust-remote-code` flag), so a model folder's Python never runs
unasked (transformers would otherwise prompt, and a `y` would run it).

Needs only torch and transformers, imported when used (no datasets, wandb or pydantic), so evals may use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from lctk.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
HUB_PROBE_SECONDS = 3.0
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes; the safetensors library's own limit
TRUST_REMOTE_CODE_HELP = "let model folders run their own Python code (only for models you trust)"
_remote_code = ContextVar("lctk_trust_remote_code", default=False)


def remote_code_trusted() -> bool:
    return _remote_code.get()


@contextlib.contextmanager
def trusting_remote_code(trusted: bool) -> Iterator[None]:
    """Within the block, from_pretrained calls made by lctk may run a model folder's own Python code."""
    token = _remote_code.set(trusted)
    try:
        yield
    finally:
        _remote_code.reset(token)


@dataclass
class ModelFiles:
    """A model whose config has been read and whose weight files have been checked (no weights loaded yet)."""

    path: str  # as the user gave it
    source: str  # what from_pretrained reads: a folder or a hub name
    options: dict = field(default_factory=dict)  # from_pretrained keywords: gguf_file, local_files_only
    config: object = None

    @property
    def local_folder(self) -> Path | None:
        return Path(self.source) if self.options.get("local_files_only") else None

    def has_tokenizer(self) -> bool:
        folder = self.local_folder
        return folder is None or any((folder / name).is_file() for name in TOKENIZER_FILES)


def open_model(path: str, where: str) -> ModelFiles:
    """Resolve `path`, check config.json and the weight files, read the config. `where` names the flag or recipe
    key in messages (e.g. "--model", "distill.teacher")."""
    files = resolve(path, where)
    folder = files.local_folder
    if folder is None:
        files.config = load_config(files, where)
        return files
    check_config_file(folder / "config.json", where)
    stored = check_weight_files(folder, where)
    files.config = load_config(files, where)
    check_shapes(files, stored, where)
    return files


def resolve(path: str, where: str) -> ModelFiles:
    """A folder, a .gguf file or (reachable) hub name -> ModelFiles without a config; UserError otherwise."""
    if not path.strip():  # Path("") is the current folder
        raise UserError(f"{where}: give a model folder, got an empty path")
    local = Path(path).expanduser()
    if path.endswith(".gguf"):
        if not local.is_file():
            raise UserError(f"{where}: model file not found: {path}")
        try:
            import gguf  # noqa: F401
        except ImportError as error:
            raise UserError(f"{where}: reading a .gguf file needs the gguf package: pip install gguf") from error
        return ModelFiles(path, str(local.resolve().parent), {"gguf_file": local.name})
    if local.is_dir():
        return ModelFiles(path, str(local), {"local_files_only": True})
    if local.exists():
        raise UserError(f"{where}: model path is not a folder or a .gguf file: {path}")
    if looks_local(path) or not hub_reachable():
        raise UserError(f"{where}: model folder not found: {path}")
    return ModelFiles(path, path)


def looks_local(path: str) -> bool:
    """Whether a missing path is a local typo rather than a hub name `org/name`."""
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        return True
    return Path(path.split("/")[0]).exists()


def hub_reachable() -> bool:
    """False when offline mode is set or no TCP connection to the hub opens within HUB_PROBE_SECONDS (the probe
    runs in a thread, so a slow name lookup cannot hold it up either)."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    reached = threading.Event()

    def probe() -> None:
        with contextlib.suppress(OSError), socket.create_connection(
            (endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=HUB_PROBE_SECONDS
        ):
            reached.set()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    prober.join(HUB_PROBE_SECONDS)
    return reached.is_set()


def check_config_file(file: Path, where: str) -> dict:
    """config.json must be a JSON object naming its model_type."""
    if not file.is_file():
        raise UserError(f"{where}: no config.json in {file.parent} (expected a Hugging Face model folder)")
    try:
        config = json.loads(file.read_bytes())
    except (ValueError, OSError) as error:
        raise UserError(f"{where}: {file} is not valid JSON ({_first_line(error)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{where}: {file} holds a JSON {type(config).__name__}, not an object of config keys")
    if not isinstance(config.get("model_type"), str):
        raise UserError(f"{where}: {file} has no model_type (is it a Hugging Face model config?)")
    return config


def check_weight_files(folder: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Every *.safetensors file of the folder (the shards of an index included) has a sound header that covers it.
    Returns the shape of every tensor they hold."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{where}: {index} is not a weight index ({_first_line(error)})") from None
        missing = sorted(name for name in map(str, shards) if not (folder / name).is_file())
        if missing:
            raise UserError(f"{where}: {index} names {missing[0]}, which is not in {folder}")
    if not files and not any(folder.glob("*.bin")) and not index.is_file():
        raise UserError(f"{where}: no weights (model.safetensors) in {folder}")
    shapes = {}
    for file in files:
        header = safetensors_header(file, where)
        shapes.update((name, tuple(entry.get("shape", ()))) for name, entry in header.items() if name != "__metadata__")
    return shapes


def check_shapes(files: ModelFiles, stored: dict[str, tuple[int, ...]], where: str) -> None:
    """The model config.json describes (built on the meta device: no memory) against the stored tensors' shapes,
    before anything is allocated: a config whose sizes do not match the weights (or are absurd) fails here. Tensors
    stored under other names (older checkpoint layouts that transformers renames) are checked after loading."""
    import torch
    from transformers import AutoModelForCausalLM

    with quiet_transformers(), torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(files.config, trust_remote_code=remote_code_trusted())
        except Exception as error:  # see load_config
            raise UserError(f"{where}: {files.path}/config.json describes no model lctk can build ({_reason(error)})") from None
    for name, tensor in model.state_dict().items():
        if name in stored and tuple(tensor.shape) != stored[name]:
            raise UserError(
                f"{where}: the weights in {files.path} do not match its config.json: {name} is {stored[name]} in the "
                f"weights but {tuple(tensor.shape)} in the config"
            )


def safetensors_header(file: Path, where: str) -> dict:
    """The header of a safetensors file: 8 bytes of header length, a JSON header, then exactly the tensors' bytes."""
    if not file.is_file():
        raise UserError(f"{where}: {file} is not a file")
    size = file.stat().st_size
    if size == 0:
        raise UserError(f"{where}: {file} is empty")
    with file.open("rb") as stream:
        head = stream.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8:
            raise UserError(f"{where}: {file} is truncated: {size} bytes")
        if not 2 <= length <= MAX_SAFETENSORS_HEADER:
            raise UserError(f"{where}: {file} is not a safetensors file (its first 8 bytes are no header length)")
        if length > size - 8:
            raise UserError(f"{where}: {file} is truncated: {size} bytes, its header alone needs {8 + length}")
        try:
            header = json.loads(stream.read(length))
            tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
            ends = [entry["data_offsets"][1] for entry in tensors.values()]
            shapes = [entry.get("shape") for entry in tensors.values()]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise UserError(f"{where}: {file} is not a safetensors file (bad header: {_first_line(error)})") from None
    if not all(isinstance(end, int) for end in ends):
        raise UserError(f"{where}: {file} is not a safetensors file (bad tensor offsets in its header)")
    if not all(isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) for shape in shapes):
        raise UserError(f"{where}: {file} is not a safetensors file (bad tensor shapes in its header)")
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        raise UserError(f"{where}: {file} is truncated: {size} bytes, its header describes {expected}")
    if expected < size:
        raise UserError(f"{where}: {file} is damaged: {size - expected} bytes after its last tensor")
    return header


def load_config(files: ModelFiles, where: str):
    from transformers import AutoConfig

    import lctk.models  # noqa: F401  (registers lctk_hybrid with the Auto classes)

    with quiet_transformers():
        try:
            return AutoConfig.from_pretrained(files.source, trust_remote_code=remote_code_trusted(), **files.options)
        except Exception as error:  # a user's file can fail inside transformers in many ways; all are about the file
            raise UserError(f"{where}: cannot read the model config of {files.path} ({_reason(error)})") from None


def load_tokenizer(files: ModelFiles, where: str, hint: str = ""):
    """The tokenizer of `files`; a folder without tokenizer files is reported as such (with `hint`, e.g. a flag)."""
    from transformers import AutoTokenizer

    if not files.has_tokenizer():
        raise UserError(f"{where}: no tokenizer in {files.path}" + (f" ({hint})" if hint else ""))
    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(files.source, trust_remote_code=remote_code_trusted(), **files.options)
        except Exception as error:  # see load_config
            raise UserError(f"{where}: cannot load the tokenizer of {files.path} ({_reason(error)})") from None


def load_causal_lm(files: ModelFiles, where: str, dtype=None):
    """The causal LM of `files` on the CPU; UserError when its weights cannot be read or do not fit its config."""
    from transformers import AutoModelForCausalLM

    options = {**files.options, "dtype": dtype} if dtype is not None else files.options
    with quiet_transformers():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                files.source, config=files.config, trust_remote_code=remote_code_trusted(), output_loading_info=True,
                ignore_mismatched_sizes=True, **options,  # mismatches are reported below, in one line
            )
        except Exception as error:  # see load_config; MemoryError for absurd sizes is an Exception too
            raise UserError(f"{where}: cannot load a causal LM from {files.path} ({_reason(error)})") from None
    problems = [
        f"{name} is {tuple(stored)} in the weights but {tuple(expected)} in the config"
        for name, stored, expected in sorted(info.get("mismatched_keys", []))[:1]
    ]
    # older checkpoints store buffers the model computes itself (rotary inv_freq): not a mismatch
    computed = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()}
    unexpected = [name for name in info.get("unexpected_keys", []) if name.rsplit(".", 1)[-1] not in computed]
    for kind, names in (("missing", info.get("missing_keys", [])), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} {kind} tensor(s), e.g. {sorted(names)[0]}")
    if problems:
        raise UserError(f"{where}: the weights in {files.path} do not match its config.json: {'; '.join(problems)}")
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load reports, warnings or progress bars from transformers: lctk reports problems itself, in one line."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _reason(error: BaseException) -> str:
    """The first line of a loader's error; when it is about the folder's own code, what to do about it."""
    reason = _first_line(error)
    if "custom code" in reason and not remote_code_trusted():
        return f"it ships its own Python code, which lctk runs only with --trust-remote-code: {reason}"
    return reason


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
