"""What the vLLM plugin can serve, read from a config alone (HybridConfig or config.json's dict): no vLLM, no torch.

Served: `A` (vLLM attention), `S` (vLLM attention with a sliding window), `M` (vLLM's MambaMixer2) with the paper's
layer as lctk defines it, `G` (vLLM's Gated DeltaNet, QwenGatedDeltaNetAttention in Qwen3.5's flat q/k/v/z layout).
vLLM's `G` computes lctk's definition (fla's layer: silu conv without bias over q/k/v, L2-normed q/k, scale
1/sqrt(d_k), g = -exp(A_log) softplus(W_a x + dt_bias), beta = sigmoid(W_b x), RMSNorm per head before the silu gate
with eps rms_norm_eps, expand_v). Where its numbers differ:
- its CPU kernels run only in bfloat16 (an fp32 model stops at an assert there): q, k, v and beta in bf16, the gate g
  and the recurrent state in fp32; lctk runs the layer in the model's dtype with fp32 norms, gates and state. A `G`
  model is served with dtype bfloat16 on a CPU (`lctk serve` passes it; the plugin says so in one line otherwise); the tests bound vLLM's
  log-probabilities by lctk's own bf16 error instead of asking for fp32 lctk's greedy tokens.
- the L2 norm's epsilon: vLLM's CPU prefill op is called with its default 1e-5, lctk (and fla) use 1e-6.
- vLLM's CPU prefill kernel takes only d_v = d_k in 64 or 128: the plugin runs lctk's d_v = expand_v * d_k as
  expand_v value heads of d_k each (the same recurrence: value channels update independently) and refuses on a CPU
  another head_dim, and anywhere an expand_v that is not a whole number.
(vLLM's Olmo-Hybrid GDN layer takes the same flat projections but has only Triton kernels; Kimi's GDN is KDA.)
Refused, with one line naming the letter or setting:
- A pattern with neither `M` nor `G`: vLLM runs a hybrid model class only with at least one recurrent layer.
- `K`: vLLM's KDA has no CPU path. `B`, `C`, `T`, `L`: no vLLM layer (a MambaBase subclass each would be needed).
- Mamba-2's length-generalisation settings (dt_scale, b_scale, state_norm_cap, state_window): vLLM's MambaMixer2 has
  none of them. (xb_heads, x and B shared across heads, is served: the plugin repeats the shared weights at load.)
"""

from __future__ import annotations

from typing import Any

SERVED_LETTERS = "ASMG"
MIXER_NAMES = {
    "A": "attention", "S": "sliding-window attention", "M": "Mamba-2", "B": "BASED linear attention",
    "C": "gated short convolution", "T": "Titans", "L": "LaCT", "G": "Gated DeltaNet", "K": "Kimi Delta Attention",
}
WHY_NOT = {
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
    if "M" not in pattern and "G" not in pattern:
        return (f"pattern {pattern!r} has no `M` or `G` layer: the plugin's model is a vLLM hybrid, which needs a "
                "recurrent layer (all-attention lctk models are not served yet)")
    expand_v = (get("gated_deltanet") or {}).get("expand_v", 1) if "G" in pattern else 1
    if expand_v != round(expand_v):
        return (f"gated_deltanet.expand_v = {expand_v}: vLLM's Gated DeltaNet takes value heads of d_k channels, so "
                "expand_v must be a whole number")
    settings = get("mamba2") or {}
    for key, off in MAMBA2_OFF.items():
        value = settings.get(key, off)
        if any(item != off for item in (value if isinstance(value, list) else [value])):
            return f"mamba2.{key} = {value!r}: vLLM's Mamba-2 layer has no such setting (serve with it off)"
    return None
