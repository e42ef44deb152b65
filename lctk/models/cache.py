"""HybridCache: one state object per layer (keys and values for attention, conv + SSM state for Mamba-2, ...).

No state is copied per token. Attention keeps its keys and values in an `AttentionState`
(lctk.models.mixers.attention): transformers' `StaticLayer` (the layer of its StaticCache: buffers [B, H_kv, capacity,
D] allocated once and written in place at fixed addresses) with two additions: the capacity grows geometrically when
nobody said how long the sequence gets (a plain forward with a cache; `generate` says: prompt + max_new_tokens), and a
sliding window is a ring of `window` slots, where transformers' StaticSlidingWindowLayer rolls (copies) the whole
window every token. Recurrent states (Mamba-2, BASED, BaseConv) are fixed-size tensors updated in place by the decode
step (`lctk.models.mixers.linear_recurrence.recurrent_step`, `lctk.models.layers.stateful_conv`). That is the contract
of transformers' LinearAttentionLayer (conv and recurrent buffers written with copy_), but not its code: it keeps the
raw last K conv inputs where a packed or left-padded row needs them cut at document boundaries and padding, its
`update_recurrent_state` copies in a new state where the decode step updates the state in place (one pass less), and
it has no batch-row selection. Titans (`T`) and LaCT (`L`) keep their own states: fast weights, the phase of a partly
filled chunk and a window of keys, nothing a cache layer models. The interface a mixer's state follows is in
lctk.models.mixers.base.MixerState.

HybridCache is not a transformers `Cache` subclass (those hold one such layer object per layer and answer for it); it
offers the part of that interface generate() uses: get_seq_length, is_linear, is_compileable, reorder_cache and batch
selection. `preallocated_cache` / `preallocated_generation` give any causal LM a cache allocated once.
"""

from __future__ import annotations

from torch import Tensor

from lctk.models.mixers import MixerState


class HybridCache:
    is_compileable = False

    def __init__(self, states: list[MixerState], letters: str):
        self.states = states
        self.letters = letters
        self.seen_tokens = 0

    @classmethod
    def for_model(cls, model, batch_size: int, device=None, dtype=None, max_length: int | None = None) -> HybridCache:
        """An empty cache for `model` (a HybridModel or HybridForCausalLM); `max_length`: the tokens it will hold
        (prompt + new tokens), when known, so that attention allocates its buffers once."""
        base = getattr(model, "model", model)
        param = next(base.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        states = [layer.mixer.init_state(batch_size, device, dtype) for layer in base.layers]
        if max_length is not None:
            for state in states:
                state.reserve(max_length)
        return cls(states, base.config.pattern)

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, layer_idx: int) -> MixerState:
        return self.states[layer_idx]

    @property
    def is_linear(self) -> list[bool]:
        """No layer, recurrent ones included: transformers reads `all(is_linear)` as "the cache cannot say how many
        tokens it holds" and then feeds the whole input_ids of a continued generate() on top of the state. This cache
        counts its tokens exactly (seen_tokens), so generate() may strip the cached prefix for every pattern."""
        return [False] * len(self.letters)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for state in self.states:
            state.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for state in self.states:
            state.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        for state in self.states:
            state.map_batch(lambda t: t[indices])

    def tensors(self) -> dict[str, Tensor]:
        """Every state tensor by name, e.g. `layers.3.ssm` (for state statistics)."""
        return {f"layers.{i}.{name}": t for i, s in enumerate(self.states) for name, t in s.tensors().items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def __repr__(self) -> str:
        return f"HybridCache(pattern={self.letters!r}, seen_tokens={self.seen_tokens})"


def preallocated_cache(model, batch_size: int, max_length: int):
    """A cache for `max_length` tokens of `batch_size` rows, allocated once, to pass to a forward that continues token
    by token: an lctk model's HybridCache sized for them; transformers' StaticCache for a model whose class runs on
    one (`_can_compile_fullgraph`, transformers' own mark: Llama, Mistral, Qwen2, Mamba-2, ...); None otherwise (the
    model then makes its own cache)."""
    if getattr(getattr(model, "config", None), "model_type", None) == "lctk_hybrid":
        return HybridCache.for_model(model, batch_size, max_length=max_length)
    if not runs_on_a_static_cache(model):
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=max_length)


def preallocated_generation(model) -> dict:
    """generate() keywords that preallocate `model`'s cache: cache_implementation="static" for a transformers model
    that runs on a static cache (see preallocated_cache); nothing for lctk models (generate sizes their HybridCache
    from max_new_tokens) or for classes that keep their own cache."""
    return {"cache_implementation": "static"} if runs_on_a_static_cache(model) else {}


def runs_on_a_static_cache(model) -> bool:
    return (getattr(model, "_can_compile_fullgraph", False) and hasattr(model, "_supports_default_dynamic_cache")
            and model._supports_default_dynamic_cache()
            and getattr(getattr(model, "config", None), "model_type", None) != "lctk_hybrid")


__all__ = ["HybridCache", "preallocated_cache", "preallocated_generation", "runs_on_a_static_cache"]
