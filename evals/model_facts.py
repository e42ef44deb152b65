"""Facts about any Hugging Face causal LM that the evals read: its length limit, training length, device, cache
tensors and inference state size.

Length limit: the first positive integer among the config's max_position_embeddings / n_positions /
max_sequence_length / seq_length / n_ctx; else the tokenizer's model_max_length when it is a real number (< 1e9);
else none (recurrent models). An eval length above it is refused unless `allow_longer` (for RoPE models one
deliberately runs past it to measure extrapolation).

State size (elements per sequence after L tokens): `model.state_size(L)` where the model has one (lctk models; a
per-layer list is summed); otherwise measured on the cache objects of the installed transformers: per cache layer, the
elements of its floating-point tensors (integer ones are counters) after prefilling 8 and 16 tokens, extended
linearly to L; a layer with a `sliding_window` is measured after min(L, window + 8) tokens instead. That gives
2 x layers x kv_heads x head_dim x L for attention and a constant for Mamba-2.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

LIMIT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


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
