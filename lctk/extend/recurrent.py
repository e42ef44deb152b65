"""Training-free length generalisation for the Mamba-2 layers of an lctk model: choose and calibrate the settings
that `lctk.models.mixers.mamba2` applies (dt_scale, b_scale, state_norm_cap, state_window; equations in
lctk.models.mixers.mamba2_length_generalisation).

Beyond its training length a recurrent layer meets states it never saw: a head whose decay is close to 1 keeps
adding to its state, the norm grows, and the outputs built on it collapse ("state collapse", Chen et al. 2024,
"Stuffed Mamba"). The methods:

    dt_scale      dt <- s dt in every (or each) Mamba-2 layer: s > 1 forgets faster
    b_scale       B <- s B: s < 1 writes less into the state per token
    state_norm    cap each head's state norm at the largest norm it reaches on in-length input (x margin), measured
                  where the cap applies: every `every` tokens (config.mamba2.state_norm_every; default L / 16, at
                  most 64, L the original length)
    state_window  keep only the last r tokens in the state (default r = the original training length)
    calibrate_dt  MambaExtend-style (Azizi et al. 2025): per-layer dt scales that minimise the LM loss on a
                  held-out sequence at the target length, found by coordinate search over a grid of scales (a few
                  forward passes per layer and no gradients; MambaExtend uses zeroth-order optimisation)

Per-layer values are written into `config.mamba2` as lists indexed by layer position in the pattern (null at
layers that are not Mamba-2), so `from_pretrained` gives back the extended model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lctk.errors import UserError

DT_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)
MIN_GAIN = 1e-4  # relative loss improvement a calibrated scale must bring
RECURRENT_PARAMETERS: dict[str, dict[str, Any]] = {
    "dt_scale": {"scale": None},
    "b_scale": {"scale": None},
    "state_norm": {"margin": 1.0, "every": None},
    "state_window": {"window": None},
    "calibrate_dt": {"grid": DT_GRID, "sweeps": 1},
}
RECURRENT_METHODS = tuple(RECURRENT_PARAMETERS)
NEEDS_IN_LENGTH_TEXT = {"state_norm"}
NEEDS_LONG_TEXT = {"calibrate_dt"}


def mamba_layers(model, where: str = "recurrent") -> list[int]:
    """Positions of the Mamba-2 layers; a model without any cannot take a recurrent method."""
    pattern = getattr(model.config, "pattern", None)
    layers = [i for i, letter in enumerate(pattern or "") if letter == "M"]
    if not layers:
        raise UserError(f"{where}.method: the model has no Mamba-2 layers (needs an lctk model with 'M' in its pattern)")
    return layers


def set_per_layer(config, key: str, values: dict[int, Any]) -> list[Any]:
    """Write config.mamba2[key] as a list over the pattern: values[i] at Mamba-2 layer i, null elsewhere."""
    per_layer = [values.get(i) if letter == "M" else None for i, letter in enumerate(config.pattern)]
    config.mamba2[key] = per_layer
    return per_layer


def check_recurrent(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters with defaults filled in; ValueError("key: problem") for a bad method or parameter
    (what can be checked without the model)."""
    if method not in RECURRENT_PARAMETERS:
        raise ValueError(f"method: unknown method {method!r}; known: {', '.join(RECURRENT_METHODS)}")
    unknown = sorted(k for k, v in params.items() if v is not None and k not in RECURRENT_PARAMETERS[method])
    if unknown:
        known = ", ".join(sorted(RECURRENT_PARAMETERS[method]))
        raise ValueError(f"{unknown[0]}: not a parameter of {method}; its parameters: {known}")
    settings = {**RECURRENT_PARAMETERS[method], **{k: v for k, v in params.items() if v is not None}}
    if method in ("dt_scale", "b_scale"):
        scale = settings["scale"]
        if scale is None:
            raise ValueError(f"scale: {method} needs a scale (a positive number, or a list with one per layer)")
        for number in scale if isinstance(scale, list) else [scale]:
            if number is not None and not _is_positive(number):
                raise ValueError(f"scale: must be a positive number, got {number!r}")
    elif method == "state_window":
        _require_count("window", settings["window"], optional=True)
    elif method == "state_norm":
        if not _is_positive(settings["margin"]):
            raise ValueError(f"margin: must be a positive number, got {settings['margin']!r}")
        _require_count("every", settings["every"], optional=True)
    else:
        grid = settings["grid"]
        if not isinstance(grid, (list, tuple)) or not grid or not all(_is_positive(s) for s in grid):
            raise ValueError(f"grid: must be a non-empty list of positive scales, got {grid!r}")
        _require_count("sweeps", settings["sweeps"])
    return settings


def apply_recurrent(
    model,
    method: str,
    params: dict[str, Any],
    original_length: int,
    in_length_ids: Callable[[], Tensor] | None = None,
    long_ids: Callable[[], Tensor] | None = None,
    log: Callable[[str], None] = lambda line: None,
    where: str = "recurrent",
) -> dict[str, Any]:
    """Apply one method to the model (its config, which the mixers read at every forward) and return what was
    set, for the record. in_length_ids / long_ids give token ids [B, T] at the original / target length when the
    method needs them. Errors name `where`.<key>."""
    settings = check_applicable(model, method, params, where)
    layers = mamba_layers(model, where)
    config = model.config

    if method in ("dt_scale", "b_scale"):
        scale = settings["scale"]
        values = {i: float(scale[i] if isinstance(scale, list) else scale) for i in layers}
        values = {i: v for i, v in values.items() if not (isinstance(scale, list) and scale[i] is None)}
        return {method: set_per_layer(config, method, values)}
    if method == "state_window":
        window = settings["window"] or original_length
        return {"state_window": set_per_layer(config, "state_window", dict.fromkeys(layers, window))}
    if method == "state_norm":
        every = settings["every"] or max(1, min(64, original_length // 16))
        config.mamba2["state_norm_every"] = every
        norms = max_state_norms(model, in_length_ids(), every)
        caps = {i: [round(float(n) * settings["margin"], 6) for n in norms[i]] for i in layers}
        log(f"state_norm: caps calibrated on {original_length}-token input every {every} tokens (margin {settings['margin']:g})")
        return {"state_norm_cap": set_per_layer(config, "state_norm_cap", caps), "state_norm_every": every}
    scales, losses = calibrate_dt_scales(model, long_ids(), [float(s) for s in settings["grid"]], settings["sweeps"], log)
    return {"dt_scale": scales, "calibration_loss": losses}


def check_applicable(model, method: str, params: dict[str, Any], where: str = "recurrent") -> dict[str, Any]:
    """The method's settings, checked against the model as it is now (lctk extend checks every step before its first
    write): Mamba-2 layers to act on, per-layer lists as long as the pattern, state_norm and state_window not both."""
    try:
        settings = check_recurrent(method, params)
    except ValueError as error:
        raise UserError(f"{where}.{error}") from None
    mamba_layers(model, where)
    config = model.config
    scale = settings.get("scale")
    if method in ("dt_scale", "b_scale") and isinstance(scale, list) and len(scale) != len(config.pattern):
        raise UserError(f"{where}.scale: a per-layer list needs one entry per layer of the pattern ({len(config.pattern)})")
    conflicts = {"state_window": ("state_norm_cap", "state_norm"), "state_norm": ("state_window", "state_window")}
    if method in conflicts:
        key, other = conflicts[method]
        if any(value is not None for value in _as_list(config.mamba2.get(key), config.pattern)):
            raise UserError(f"{where}.method: {method} cannot be combined with {other}")
    return settings


@torch.no_grad()
def max_state_norms(model, ids: Tensor, stride: int) -> dict[int, Tensor]:
    """The largest Frobenius norm each Mamba-2 head's state reaches after every `stride` tokens of `ids` [B, T]
    (fed through the cache): {layer: [H]}. Any state cap is lifted while measuring."""
    from lctk.models import HybridCache

    layers = mamba_layers(model)
    saved = model.config.mamba2.get("state_norm_cap")
    model.config.mamba2["state_norm_cap"] = None
    try:
        cache = HybridCache.for_model(model, ids.shape[0])
        peaks = {i: None for i in layers}
        for start in range(0, ids.shape[1], stride):
            model(ids[:, start : start + stride], cache=cache, use_cache=True)
            for i in layers:
                norms = cache[i].ssm.flatten(2).norm(dim=-1).amax(0)  # [H]
                peaks[i] = norms if peaks[i] is None else torch.maximum(peaks[i], norms)
    finally:
        model.config.mamba2["state_norm_cap"] = saved
    return peaks


@torch.no_grad()
def calibrate_dt_scales(
    model, ids: Tensor, grid: list[float], sweeps: int, log: Callable[[str], None] = lambda line: None
) -> tuple[list[float | None], dict[str, float]]:
    """Coordinate search: for each Mamba-2 layer in turn (sweeps times), the grid scale with the lowest loss on
    ids [B, T] given the others. Returns (per-layer scales as written into the config, losses before / after)."""
    layers = mamba_layers(model)
    current = _as_list(model.config.mamba2.get("dt_scale"), model.config.pattern)
    scales = {i: float(current[i] or 1.0) for i in layers}

    def loss_with(candidate: dict[int, float]) -> float:
        set_per_layer(model.config, "dt_scale", candidate)
        return float(model(ids, labels=ids, use_cache=False).loss)

    start = best = loss_with(scales)
    for sweep in range(sweeps):
        for i in layers:
            for scale in grid:
                if scale == scales[i]:
                    continue
                trial = loss_with({**scales, i: scale})
                if trial < best - MIN_GAIN * abs(best):  # not for noise-level gains
                    best, scales = trial, {**scales, i: scale}
            log(f"calibrate_dt: sweep {sweep + 1} layer {i} scale {scales[i]} loss {best:.4f}")
    per_layer = set_per_layer(model.config, "dt_scale", scales)
    return per_layer, {"before": round(start, 5), "after": round(best, 5)}


def _as_list(value: Any, pattern: str) -> list[Any]:
    return value if isinstance(value, list) else [value if letter == "M" else None for letter in pattern]


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _require_count(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
