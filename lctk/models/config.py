"""HybridConfig: a decoder whose layers follow a pattern string, one letter per layer.

Letters (see ARCHITECTURE.md): A global attention, S sliding-window attention, M Mamba-2, B BASED linear attention,
C gated short convolution (BaseConv), T Titans neural memory, L LaCT. Per-mixer settings live in sub-sections named
after the mixer (`attention`, `mamba2`, ...). A section is filled from the mixer's defaults, which may depend on
hidden_size and num_attention_heads, and validated, for every letter the pattern uses.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class HybridConfig(PretrainedConfig):
    model_type = "lctk_hybrid"
    keys_to_ignore_at_inference = ["cache"]

    pattern: str = "MMAMMA"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int | None = None
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    attention: dict | None = None
    mamba2: dict | None = None
    based: dict | None = None
    baseconv: dict | None = None
    titans: dict | None = None
    lact: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        from lctk.models.mixers import MIXERS, section_of

        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("pattern: must be a non-empty string of layer letters, e.g. 'MMAMMA'")
        unknown = sorted(set(self.pattern) - set(MIXERS))
        if unknown:
            raise ValueError(f"pattern: unknown layer letter(s) {unknown}; known: {''.join(sorted(MIXERS))}")
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size: {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            # SwiGLU at ~8/3 d, rounded up to a multiple of 64
            self.intermediate_size = -(-(8 * self.hidden_size // 3) // 64) * 64
        self.num_hidden_layers = len(self.pattern)
        for letter in sorted(set(self.pattern)):
            mixer = MIXERS[letter]
            name = section_of(letter)
            given = getattr(self, name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{name}: must be a mapping of settings, got {type(given).__name__}")
            settings = {**mixer.default_settings(self), **given}
            unknown_keys = sorted(set(settings) - set(mixer.default_settings(self)))
            if unknown_keys:
                raise ValueError(f"{name}.{unknown_keys[0]}: unknown setting; known: {sorted(mixer.default_settings(self))}")
            mixer.check_settings(settings, self)
            setattr(self, name, settings)
        super().__post_init__(**kwargs)
