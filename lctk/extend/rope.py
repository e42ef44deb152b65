"""RoPE scaling for attention layers, written into a config the way transformers reads it.

A rotary layer turns position m into angles m * w_i, w_i = theta^(-2i/d). To use a model trained at length L at
L' = s L (s = factor) the methods change the w_i (and, for YaRN, scale cos/sin by an attention factor):

    linear   w_i / s                                   position interpolation (Chen et al. 2023)
    dynamic  theta' = theta (s T / L - (s - 1))^(d / (d - 2)) once the input length T exceeds L   (dynamic NTK)
    yarn     per frequency, a ramp between w_i (wavelengths shorter than L / beta_fast rotations) and w_i / s
             (longer than L / beta_slow), cos/sin x attention_factor (default 0.1 ln s + 1)   (Peng et al. 2023)
    llama3   w_i kept for wavelengths < L / high_freq_factor, w_i / s above L / low_freq_factor, smooth between
    theta    plain base change theta' (default the NTK-aware theta s^(d / (d - 2))), rope_type stays default

The result goes into `config.rope_parameters` (the transformers v5 layout, which both lctk's RotaryEmbedding and
Llama-family models read through transformers' own ROPE_INIT_FUNCTIONS), and `write_legacy_rope_keys` adds the older
layout (top-level `rope_theta` + `rope_scaling`) to a saved config.json for transformers 4.x readers.
`max_position_embeddings` becomes s L, except for dynamic: transformers' dynamic NTK takes max_position_embeddings
as the pretraining length, so it stays L (the extended length is in the record). The record,
`config.lctk_extension`, keeps the original length and rope parameters, so extending again composes the factors
(the same method only) rather than stacking one scaling on another.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lctk.errors import UserError

ROPE_METHODS = ("linear", "dynamic", "yarn", "llama3", "theta")
# per method: its optional parameters and their defaults (None = let transformers derive it)
ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {},
    "dynamic": {},
    "yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None},
    "llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "theta": {"rope_theta": None},
}
RECORD = "lctk_extension"


def extension_record(config) -> dict[str, Any]:
    """What earlier extensions recorded (empty for a model never extended)."""
    return dict(getattr(config, RECORD, None) or {})


def original_length(config) -> int:
    """The length the model was trained at: recorded by an earlier extension, else the rope parameters' original
    length (e.g. Llama 3.1 ships llama3 scaling), else `train_length` (set by `lctk train`), else
    max_position_embeddings."""
    record = extension_record(config)
    if "original_max_position_embeddings" in record:
        return int(record["original_max_position_embeddings"])
    rope = config.rope_parameters or {}
    found = rope.get("original_max_position_embeddings") or getattr(config, "train_length", None)
    return int(found or config.max_position_embeddings)


def check_rope(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters with defaults filled in; ValueError("key: problem") for a bad method or parameter."""
    if method not in ROPE_METHODS:
        raise ValueError(f"method: unknown method {method!r}; known: {', '.join(ROPE_METHODS)}")
    unknown = sorted(key for key, value in params.items() if value is not None and key not in ROPE_PARAMETERS[method])
    if unknown:
        known = ", ".join(sorted(ROPE_PARAMETERS[method])) or "none"
        raise ValueError(f"{unknown[0]}: not a parameter of {method}; its parameters: {known}")
    settings = {**ROPE_PARAMETERS[method], **{k: v for k, v in params.items() if v is not None}}
    for name, value in settings.items():
        if value is not None:
            settings[name] = _positive_number(name, value)
    if method == "yarn" and settings["beta_fast"] <= settings["beta_slow"]:
        raise ValueError("beta_fast: must be greater than beta_slow")
    if method == "llama3" and settings["high_freq_factor"] <= settings["low_freq_factor"]:
        raise ValueError("high_freq_factor: must be greater than low_freq_factor")
    return settings


# The largest extension factor accepted. Published RoPE extensions stop well below it (YaRN and LongRoPE report
# 16-512x, LongRoPE's largest is 4K -> 2M tokens) and the recurrent-state methods are studied at 2-16x: a larger
# factor is a typo, not a context any method reaches.
MAX_FACTOR = 1024


def check_factor(factor: Any) -> float:
    factor = _positive_number("factor", factor)
    if factor < 1:
        raise ValueError(f"factor: must be >= 1 (the new length over the original), got {factor:g}")
    if factor > MAX_FACTOR:
        raise ValueError(f"factor: must be at most {MAX_FACTOR} (the new length over the original), got {factor:g}")
    return factor


def scale_rope(config, method: str, factor: float, where: str = "rope", **params: Any) -> dict[str, Any]:
    """Rewrite config.rope_parameters / max_position_embeddings for `method` at `factor` x the original length, and
    record the change in config.lctk_extension. Returns the new rope_parameters. Errors name `where`.<key>."""
    try:
        factor = check_factor(factor)
        settings = check_rope(method, params)
    except ValueError as error:
        raise UserError(f"{where}.{error}") from None
    record = extension_record(config)
    base = dict(record.get("original_rope_parameters") or config.rope_parameters or {})
    length = original_length(config)
    previous_type = base.get("rope_type", "default")
    if previous_type not in ("default", _rope_type(method)):
        raise UserError(f"{where}.method: the model already uses {previous_type} RoPE scaling; extend it with that method")
    previous = record.get("rope")  # its factor is the total over the original length
    if previous:
        if previous["method"] != method:
            raise UserError(
                f"{where}.method: the model was extended with {previous['method']}; extend it again with that method"
            )
        factor *= previous["factor"]
    elif previous_type != "default":  # e.g. Llama 3.1 ships llama3 at factor 8: compose with it
        factor *= float(base.get("factor", 1.0))

    theta = float(base.get("rope_theta", 10000.0))
    keep = {key: base[key] for key in ("partial_rotary_factor",) if key in base}
    if method == "theta":
        dim = _rotary_dim(config, base)
        new_theta = settings["rope_theta"] or theta * factor ** (dim / (dim - 2))
        rope = {"rope_type": "default", "rope_theta": float(new_theta), **keep}
    else:
        rope = {"rope_type": method, "rope_theta": theta, "factor": factor, **keep}
        if method in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = length
        rope.update({key: value for key, value in settings.items() if value is not None})

    config.rope_parameters = rope
    config.max_position_embeddings = length if method == "dynamic" else int(round(length * factor))
    record.update(
        original_max_position_embeddings=length,
        original_rope_parameters=base,
        target_length=int(round(length * factor)),
        rope={"method": method, "factor": factor, **{k: v for k, v in settings.items() if v is not None}},
    )
    setattr(config, RECORD, record)
    return rope


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4.x layout of the same RoPE: top-level rope_theta and rope_scaling (null for plain RoPE)."""
    scaling = {key: value for key, value in rope_parameters.items() if key != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return {"rope_theta": rope_parameters.get("rope_theta", 10000.0), "rope_scaling": scaling}


def write_legacy_rope_keys(model_dir: Path) -> None:
    """Add the older layout to a saved config.json beside `rope_parameters` (transformers 5 reads either; when both
    are present it takes rope_scaling + rope_theta, which say the same thing)."""
    path = Path(model_dir) / "config.json"
    data = json.loads(path.read_text())
    if data.get("rope_parameters"):
        data.update(legacy_rope_keys(data["rope_parameters"]))
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rope_type(method: str) -> str:
    return "default" if method == "theta" else method


def _rotary_dim(config, rope: dict[str, Any]) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a positive number, got {value!r}")
    return float(value)
