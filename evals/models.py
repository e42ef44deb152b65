"""The model side of the evals, for any Hugging Face causal LM: loading, the length limit, state size, greedy
generation, chunked streaming with a cache, and peak memory.

Length limit: the first positive integer among the config's max_position_embeddings / n_positions /
max_sequence_length / seq_length / n_ctx; else the tokenizer's model_max_length when it is a real number (< 1e9);
else none (recurrent models). An eval length above it is refused unless `allow_longer` (for RoPE models one
deliberately runs past it to measure extrapolation).

State size (elements per sequence after L tokens): `model.state_size(L)` where the model has one (lctk models; a
per-layer list is summed); otherwise measured on the cache objects of the installed transformers: per cache layer, the
elements of its floating-point tensors (integer ones are counters) after prefilling 8 and 16 tokens, extended
linearly to L; a layer with a `sliding_window` is measured after min(L, window + 8) tokens instead. That gives 2 x layers x kv_heads x
head_dim x L for attention and a constant for Mamba-2.

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the call (bytes above what was allocated before). On
CPU, the growth of the process's resident set size: on Linux its high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the RSS before the call; elsewhere RSS sampled every 10 ms by a thread (psutil). RSS
includes allocator caching and freed-but-kept pages, so CPU figures are approximate upper bounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lctk.errors import UserError
from lctk.models.loading import ModelFiles, load_causal_lm, load_tokenizer, open_model, resolve

LIMIT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
SAMPLED_VALUES = 1024  # per tensor, in weights_fingerprint
BITS_AS_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32}  # element size -> integer dtype (else int64)
# config keys that do not change outputs (the dtype is fingerprinted from the tensors themselves)
NOT_FINGERPRINTED = ("_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype")


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


def weights_fingerprint(model) -> str:
    """A short hash of what decides a model's outputs, for resume keys: its config (less NOT_FINGERPRINTED: where
    it was loaded from and what saving adds) and, for every parameter and buffer, its name, shape, dtype, the sum of
    all its values' bits read as integers (exact, so the same on any device and thread count, and changed by any
    single edit) and SAMPLED_VALUES values at evenly spaced positions. One reduction pass over the weights on their
    own device plus a few thousand values copied to the host: well under a second per billion parameters on a GPU, a
    few seconds on a CPU. The same folder loaded at another dtype gives another fingerprint; a model trained in
    memory (the trainer's evals) gets one like any other."""
    config = getattr(model, "config", None)
    described = config.to_dict() if hasattr(config, "to_dict") else {}
    for bookkeeping in NOT_FINGERPRINTED:
        described.pop(bookkeeping, None)
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    tensors = [*model.named_parameters(), *model.named_buffers()] if isinstance(model, torch.nn.Module) else []
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            bits = flat.view(BITS_AS_INTEGERS.get(flat.element_size(), torch.int64))
            count = min(bits.numel(), SAMPLED_VALUES)
            positions = torch.arange(count, device=bits.device) * max(bits.numel() - 1, 0) // max(count - 1, 1)
            total = int(bits.sum(dtype=torch.int64)) if bits.numel() else 0  # wraps around: still exact
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total}|".encode())
            digest.update(bits[positions].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_name(path: str) -> str:
    """A short, file-system-safe name for a model path (its last two path parts)."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".")]
    return re.sub(r"[^\w.-]+", "_", "-".join(parts[-2:]) or "model")


def length_limit(config, tokenizer) -> int | None:
    for name in LIMIT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return None


def training_length(model) -> int | None:
    """The length the model was trained at, when its config records it (for marking plots)."""
    config = model.config
    for name in ("train_length", "training_length", "original_max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    value = rope.get("original_max_position_embeddings") if isinstance(rope, dict) else None
    return value if isinstance(value, int) else None


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def cache_of(outputs):
    """The cache a forward returned (transformers 5 names it `cache`, older code `past_key_values`)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def iter_tensors(obj, path: str = "", seen: set[int] | None = None, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable from a cache object through attributes, dicts, lists and tuples, with its path
    (e.g. `layers.0.recurrent_states.0`, `states.3.ssm`). Modules, classes and functions are not entered."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if id(obj) in seen or depth > 8 or isinstance(obj, torch.nn.Module | type | str | bytes | int | float | bool):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: str(kv[0]))
    elif isinstance(obj, list | tuple):
        items = list(enumerate(obj))
    elif hasattr(obj, "__dict__") and not callable(obj):
        items = sorted(vars(obj).items())
    else:
        return
    for key, value in items:
        if isinstance(key, str) and key.startswith("__"):
            continue
        yield from iter_tensors(value, f"{path}.{key}" if path else str(key), seen, depth + 1)


def state_size(model, seq_len: int) -> int:
    """Inference state in elements per sequence after seq_len tokens (see module doc)."""
    own = getattr(model, "state_size", None)
    if callable(own):
        size = own(seq_len)
        return int(sum(size)) if isinstance(size, list | tuple) else int(size)
    small, large = _measured_state(model, 8), _measured_state(model, 16)
    windows = [window for _, window in small if window]
    # a sliding-window layer stops growing at a length that its class decides: measure it past the widest window
    capped = _measured_state(model, min(seq_len, max(windows) + 8)) if windows else small
    total = 0.0
    for (before, window), (after, _), (saturated, _) in zip(small, large, capped, strict=True):
        total += saturated if window else before + (after - before) / 8 * (seq_len - 8)
    return int(round(total))


@torch.no_grad()
def _measured_state(model, n_tokens: int) -> list[tuple[int, int | None]]:
    """(floating-point elements, sliding window or None) per layer of the cache after prefilling n_tokens. Integer
    tensors are bookkeeping (lengths, positions), not state."""
    ids = torch.full((1, n_tokens), 1, dtype=torch.long, device=model_device(model))
    cache = cache_of(model(input_ids=ids, use_cache=True))
    layers = getattr(cache, "layers", None)
    sizes = []
    for layer in layers if isinstance(layers, list | tuple) else [cache]:
        window = getattr(layer, "sliding_window", None)
        elements = sum(t.numel() for _, t in iter_tensors(layer) if t.is_floating_point())
        sizes.append((elements, window if isinstance(window, int) and window > 0 else None))
    return sizes


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, one_line: list[bool] | None = None
) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded when their lengths differ), decoded without specials.

    Each row stops at the end-of-text token; a row marked in `one_line` also stops at the first newline after a
    letter or digit (its answer is one line: the rest is never scored; a leading ":" or blank line is not the
    answer yet), and its output is cut there."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = model_device(model)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    rows = list(one_line or [False] * len(prompts))
    stopping = StoppingCriteriaList([_LineEnd(tokenizer, width, rows)]) if any(rows) else None
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         stopping_criteria=stopping)
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]
    return [_first_line(text) if cut else text for text, cut in zip(texts, rows, strict=True)]


def _first_line(text: str) -> str:
    """The text up to the first newline after its first letter or digit (all of it when there is none)."""
    start = next((i for i, char in enumerate(text) if char.isalnum()), len(text))
    end = text.find("\n", start)
    return text if end < 0 else text[:end]


class _LineEnd:
    """Stopping criterion: per row, True once a one-line row has written a newline after a letter or digit."""

    def __init__(self, tokenizer, width: int, rows: list[bool]):
        self.tokenizer, self.width, self.rows = tokenizer, width, rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, one_line in enumerate(self.rows):
            if one_line:
                text = self.tokenizer.decode(input_ids[row, self.width :], skip_special_tokens=True)
                done[row] = _first_line(text) != text
        return done


@dataclass
class Step:
    end: int  # tokens fed so far
    nll: torch.Tensor  # (tokens predicted in this chunk,)
    hits: torch.Tensor  # bool, same shape
    predicted: torch.Tensor  # the argmax token at each of those positions


@torch.no_grad()
def stream(model, ids: np.ndarray, chunk: int) -> Iterator[tuple[Step, object]]:
    """Feed ids chunk by chunk through the model's cache; yields (the chunk's per-token results, the cache).

    Token t (t >= 1) gets nll = -log p(ids[t] | ids[:t]), predicted = the argmax of that distribution and hit =
    (predicted == ids[t]); token 0 has none,
    so over the whole stream the results cover ids[1:] in order."""
    device = model_device(model)
    tokens = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=device).unsqueeze(0)
    cache, carried = None, None  # carried: the last logit of the previous chunk (it predicts this chunk's first token)
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start : start + chunk]
        outputs = model(input_ids=piece, use_cache=True, **({"cache": cache} if cache is not None else {}))
        cache = cache_of(outputs)
        logits = outputs.logits[0].float()
        if carried is not None:
            logits, targets = torch.cat([carried, logits[:-1]]), piece[0]
        else:
            logits, targets = logits[:-1], piece[0, 1:]
        carried = outputs.logits[0, -1:].float()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        predicted = logits.argmax(-1)
        yield Step(start + piece.shape[1], nll.cpu(), (predicted == targets).cpu(), predicted.cpu()), cache


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Measures the peak extra memory (bytes) of the block into result["bytes"] (see module doc)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        return
    if _reset_peak_rss():  # Linux keeps the resident-set high-water mark itself: exact, no sampling
        base = _proc_status_kb("VmRSS")
        yield result
        result["bytes"] = 1024 * max(_proc_status_kb("VmHWM") - base, 0)
        return
    import psutil

    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["bytes"] = int(max(peak, process.memory_info().rss) - base)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
