"""HybridCache: one state object per layer (KV for attention, conv + SSM state for Mamba-2, ...).

It is not a transformers `Cache` subclass (those are built around per-layer key/value tensors); it offers the part
of that interface generate() uses: get_seq_length, is_linear, is_compileable, reorder_cache and batch selection.
transformers 5's linear-attention and conv cache layers (Bamba, Jamba, LFM2) fit `M`, `B` and `C`, but not the
states of `T`/`L` (fast weights plus the phase of a partly filled chunk and window keys) nor `S`'s visibility of
kept keys, so a Cache subclass would wrap these per-mixer states rather than replace any code.
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
    def for_model(cls, model, batch_size: int, device=None, dtype=None) -> HybridCache:
        """An empty cache for `model` (a HybridModel or HybridForCausalLM)."""
        base = getattr(model, "model", model)
        param = next(base.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        states = [layer.mixer.init_state(batch_size, device, dtype) for layer in base.layers]
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


__all__ = ["HybridCache"]
