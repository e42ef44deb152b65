"""What the vLLM plugin can serve, read from a config alone (HybridConfig or config.json's dict): no vLLM, no torch.

Served: `A` (vLLM attention), `S` (vLLM attention with a sliding window), `M` (vLLM's MambaMixer2) with the paper's
layer as lctk defines it. Refused, with one line naming the letter or setting:
- `G`: vLLM's Gated DeltaNet (Qwen3-Next's layer) computes our definition (fla's: L2-normed q/k, scale 1/sqrt(d_k),
  norm-before-gate per head) but takes q/k/v/z and b/a interleaved per key-head group and runs on vLLM's CPU backend
  only in bf16, where greedy tokens cannot be checked against lctk's fp32 generate; it is not mapped yet.
- A pattern without `M`: vLLM runs a hybrid model class only with at least one recurrent layer.
- `K`: vLLM's KDA has no CPU path. `B`, `C`, `T`, `L`: no vLLM layer (a MambaBase subclass each would be needed).
- Mamba-2's length-generalisation settings (dt_scale, b_scale, state_norm_cap, state_window): vLLM's MambaMixer2 has
  none of them. (xb_heads, x and B shared across heads, is served: the plugin repeats the shared weights at load.)
"""

from __future__ import annotations

from typing import Any

SERVED_LETTERS = "ASM"
MIXER_NAMES = {
    "A": "attention", "S": "sliding-window attention", "M": "Mamba-2", "B": "BASED linear attention",
    "C": "gated short convolution", "T": "Titans", "L": "LaCT", "G": "Gated DeltaNet", "K": "Kimi Delta Attention",
}
WHY_NOT = {
    "G": "vLLM's Gated DeltaNet runs only in bf16 on the CPU and is not mapped yet",
    "K": "vLLM's KDA has no CPU path and is not mapped",
}
# Mamba-2 settings vLLM's MambaMixer2 does not have, with the value that means "off"
MAMBA2_OFF = {"dt_scale": 1.0, "b_scale": 1.0, "state_norm_cap": None, "state_window": None}


def servable_problem(config: Any) -> str | None:
    """Why the vLLM plugin cannot serve a model of this config (one line), or None when it can."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    pattern = get("pattern")
    if get("model_type") != "lctk_hybrid" or not isinstance(pattern, str):
        return f"not an lctk model (model_type {get('model_type')!r}, expected 'lctk_hybrid')"
    for index, letter in enumerate(pattern):
        if letter not in SERVED_LETTERS:
            why = WHY_NOT.get(letter, "it has no vLLM layer")
            return (f"layer {index} is `{letter}` ({MIXER_NAMES.get(letter, 'unknown')}), which lctk's vLLM plugin "
                    f"cannot serve: {why} (served: {', '.join(SERVED_LETTERS)})")
    if "M" not in pattern:
        return (f"pattern {pattern!r} has no `M` layer: the plugin's model is a vLLM hybrid, which needs one "
                "(all-attention lctk models are not served yet)")
    settings = get("mamba2") or {}
    for key, off in MAMBA2_OFF.items():
        value = settings.get(key, off)
        if any(item != off for item in (value if isinstance(value, list) else [value])):
            return f"mamba2.{key} = {value!r}: vLLM's Mamba-2 layer has no such setting (serve with it off)"
    return None
