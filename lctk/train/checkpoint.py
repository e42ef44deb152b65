"""Checkpoints: everything a run needs to continue exactly where it stopped.

    <checkpoints>/step-00000100/
        model.safetensors     full (unsharded) weights; tied aliases (lm_head = embeddings) stored once
        optimizer.pt          full optimizer state by parameter name (tensors and numbers only: weights_only loads)
        trainer.json          step, tokens seen, skipped steps, ... (the data position is the step: rows are
                              addressable, see lctk.data.packing; the learning rate is a function of the step)
        rng-<rank>.pt         each process's torch (and CUDA) and Python random states
        manifest.json         size and sha256 of every file above, written last

A checkpoint is written into `step-XXXXXXXX.tmp` and renamed into place once complete, so a killed run leaves at worst
a .tmp folder, which is ignored (and removed by the next run, which holds the run folder's lock). Before the first
write the main process checks that the disk has room for it (the tensors' bytes); a write the filesystem refuses on
any process (a full disk, a read-only folder, an I/O error) removes the partial checkpoint and ends every process with
the same one-line error, the earlier checkpoints untouched.

On resume every file is checked against the manifest (size and sha256), and the manifest must list each process's
rng file: a checkpoint with any file damaged or missing, optimizer.pt and rng-<rank>.pt included, is named in a
warning and the previous one used (`--resume auto`; with no usable one the run starts from scratch), or is a
one-line error (`--resume PATH`). Files that match their checksums but cannot be loaded into this run (another
model, another lctk version) are a one-line error.

Retention (`rotate`) runs once the newest checkpoint's weights have given a finite step (the Trainer confirms it), so
the last good checkpoint outlives a divergence. Of the checkpoints up to the newest, the keep_last newest complete ones
stay (complete: manifest and sizes match; checksums are verified on resume) and the rest go, damaged ones included;
checkpoints after the newest, left by an earlier attempt of the run, stay until the run reaches their step. Model and optimizer state go through torch.distributed.checkpoint's full state
dict helpers, so the same files serve one process, DDP and FSDP.

A finished model leaves as a Hugging Face folder (`save_hf_folder`: train's final/, each distill stage, extend's
results), written aside and renamed into place like a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lctk.errors import UserError, os_error_line, os_error_of
from lctk.files import check_space, move_into_place, save_safetensors, save_torch, scratch_folder

PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "trainer.json")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete-looking checkpoints (no .tmp), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=step_of)


def problem_with(path: Path, checksums: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be used, or None when every file matches its manifest (sizes only, without
    `checksums`)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (interrupted while saving?)"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    well_formed = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    )
    if not well_formed:
        return f"{MANIFEST} does not list files with their bytes and sha256"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"{MANIFEST} does not list {missing[0]}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {expected['bytes']}"
        if checksums and _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    missing = [name for name in _rng_files(path) if name not in files]
    return f"{MANIFEST} does not list {missing[0]}" if missing else None


def _rng_files(path: Path) -> list[str]:
    """The rng file of each process that wrote the checkpoint (as many as trainer.json records)."""
    try:
        saved = json.loads((path / "trainer.json").read_text())
        processes = saved.get("world_size", 1) if isinstance(saved, dict) else 1
    except (OSError, ValueError):
        processes = 1
    return [f"rng-{rank}.pt" for rank in range(processes if isinstance(processes, int) and processes > 0 else 1)]


def usable_checkpoint(path: Path) -> Path:
    """`path` as given to --resume, checked: a UserError when it is missing or damaged."""
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint folder {path} not found")
    problem = problem_with(path)
    if problem is not None:
        raise UserError(f"--resume: checkpoint {path} is damaged ({problem})")
    return path


def latest_valid(folder: Path, warn) -> Path | None:
    """The newest usable checkpoint; each damaged newer one is reported through `warn`."""
    for path in reversed(list_checkpoints(folder)):
        problem = problem_with(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is damaged ({problem}); trying the previous one")
    return None


def save_checkpoint(accelerator, folder: Path, step: int, model, optimizer, trainer_state: dict) -> Path:
    """Write a checkpoint of all processes' state; returns its path. Every process must call this. No room on the
    disk, or a write refused on any process, is the same UserError on every process (see the module docstring)."""
    final = folder / checkpoint_name(step)
    temporary = folder / f"{final.name}.tmp"
    model_state = get_model_state_dict(model, options=FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL)  # empty but on the main process
    main = accelerator.is_main_process
    aliases = tied_aliases(accelerator.unwrap_model(model)) if main else {}
    weights = {k: v.contiguous() for k, v in model_state.items() if k not in aliases} if main else {}
    size = _tensor_bytes(weights) + _tensor_bytes(optimizer_state)
    _together(accelerator, (lambda: check_space(folder, size, final)) if main else None, final)

    def weights_and_optimizer() -> None:
        save_safetensors(weights, temporary / "model.safetensors", metadata={"format": "pt"})
        save_torch(optimizer_state, temporary / "optimizer.pt")
        (temporary / "trainer.json").write_text(json.dumps(trainer_state, indent=1))

    def manifest_and_rename() -> None:
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(temporary.iterdir())}
        (temporary / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        move_into_place(temporary, final)

    # the main process's scratch folder is removed if any step fails on any process
    with scratch_folder(temporary) if main else contextlib.nullcontext():
        _together(accelerator, weights_and_optimizer if main else None, final)
        _together(accelerator, lambda: save_torch(_rng_state(), temporary / f"rng-{accelerator.process_index}.pt"),
                  final)
        _together(accelerator, manifest_and_rename if main else None, final)
    return final


def _together(accelerator, work: Callable[[], None] | None, target: Path) -> None:
    """Run `work` on this process (None: nothing to do here), then agree: when it failed on any process for lack of
    space or a refused write, every process raises that one line (and not only the one that met it, while the
    others wait for it forever)."""
    problem = None
    if work is not None:
        try:
            work()
        except Exception as error:
            fault = None if isinstance(error, UserError) else os_error_of(error)
            if fault is None and not isinstance(error, UserError):
                raise
            problem = str(error) if fault is None else os_error_line(fault, target)
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    found = next((problem for problem in problems if problem), None)
    if found:
        raise UserError(found)


def remove_unfinished(folder: Path) -> None:
    """The .tmp (and set-aside .old) folders that a killed save left; call only while holding the run folder."""
    for leftover in [*folder.glob(f"{PREFIX}*.tmp"), *folder.glob(f"{PREFIX}*.old")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) state dict: what its files hold, less their small headers."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, list | tuple):
        return sum(_tensor_bytes(value) for value in state)
    return 0


def rotate(folder: Path, newest: Path, keep_last: int) -> None:
    """Delete the checkpoints that `newest` (whose weights proved good) supersedes; see the module doc."""
    earlier = [path for path in list_checkpoints(folder) if step_of(path) <= step_of(newest)]
    complete = [path for path in earlier if problem_with(path, checksums=False) is None]
    kept = {newest, *complete[-keep_last:]}
    for path in earlier:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def set_aside(path: Path) -> Path:
    """Rename a checkpoint out of the resumable ones (its weights diverged); kept for inspection."""
    target = path.with_name(f"diverged-{path.name}")
    if target.exists():
        shutil.rmtree(target)
    return path.rename(target)


def trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint(accelerator, path: Path, model, optimizer) -> None:
    """Restore model, optimizer and this process's random states from `path`."""
    weights = load_file(str(path / "model.safetensors"))
    for alias, source in tied_aliases(accelerator.unwrap_model(model)).items():
        weights[alias] = weights[source]
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    _set_rng_state(torch.load(path / f"rng-{accelerator.process_index}.pt", weights_only=True))


def check_matches(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights have the (unwrapped) model's shapes, read from the safetensors header (nothing is
    loaded): a checkpoint of another model is one line naming a tensor, before anything is written or restored."""
    from lctk.models.loading import safetensors_header

    header = safetensors_header(path / "model.safetensors", "--resume")
    stored = {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    common = sorted(set(stored) & set(expected))
    if not common:
        raise UserError(f"--resume: checkpoint {path} holds none of this model's tensors (a checkpoint of another model?)")
    for name in common:
        if stored[name] != expected[name]:
            raise UserError(f"--resume: checkpoint {path} is of another model: {name} is {stored[name]} there but "
                            f"{expected[name]} in this recipe's model")


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters reachable under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_hf_folder(model, tokenizer, folder: Path, train_length: int | None = None) -> None:
    """The model and its tokenizer as a Hugging Face folder, written next to `folder` and renamed into place once the
    disk is known to hold its weights (lctk.files: a failure removes the partial folder and is one line). `folder`
    and its `.tmp` sibling are replaced, so they must lie in a run folder lctk made (train, distill, extend check that
    before their first write, lctk.train.rundir)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if train_length is not None and getattr(model.config, "train_length", None) is None:
        model.config.train_length = train_length
    weights = {id(p): p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()]}
    check_space(folder.parent, sum(weights.values()), folder)
    with scratch_folder(folder.with_name(folder.name + ".tmp"), folder) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        if tokenizer is not None:  # lctk extend's training-free changes work on a folder without one
            tokenizer.save_pretrained(temporary)
