"""HybridConfig: a decoder whose layers follow a pattern string, one letter per layer.

Letters (README, "The model"): A global attention, S sliding-window attention, M Mamba-2, B BASED linear attention,
C gated short convolution (BaseConv), T Titans neural memory, L LaCT, G Gated DeltaNet, K Kimi Delta Attention.
Per-mixer settings live in sub-sections named after the mixer (`attention`, `mamba2`, `gated_deltanet`, `kda`, ...).
A section is filled from the mixer's defaults, which may depend on hidden_size and num_attention_heads, and
validated, for every letter the pattern uses.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class HybridConfig(PretrainedConfig):
    model_type = "lctk_hybrid"
    keys_to_ignore_at_inference = ["cache"]

    pattern: str = "MMAMMA"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int | None = None
    mlp: bool = True  # False: blocks are mixer-only (Zoology's synthetic-recall models have no MLPs)
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
    gated_deltanet: dict | None = None
    kda: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        from lctk.models.mixers import MIXERS, section_of
        from lctk.models.mixers.base import require_positive

        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError("pattern: must be a non-empty string of layer letters, e.g. 'MMAMMA'")
        unknown = sorted(set(self.pattern) - set(MIXERS))
        if unknown:
            raise ValueError(f"pattern: unknown layer letter(s) {unknown}; known: {''.join(sorted(MIXERS))}")
        derived = ("num_key_value_heads", "head_dim", "intermediate_size")  # None: derived below
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings", *derived):
            if name not in derived or getattr(self, name) is not None:
                require_positive(name, getattr(self, name), integer=True)
        for name in ("rms_norm_eps", "initializer_range"):
            require_positive(name, getattr(self, name), integer=False)
        pad = self.pad_token_id  # the embedding's padding_idx: torch (and Llama configs) also count it from the end
        in_vocab = isinstance(pad, int) and not isinstance(pad, bool) and -self.vocab_size <= pad < self.vocab_size
        if pad is not None and not in_vocab:
            raise ValueError(f"pad_token_id: must be a token id within vocab_size {self.vocab_size}, got {pad!r}")
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
        if self.head_dim % 2 and any(MIXERS[letter].rotary for letter in self.pattern):
            raise ValueError(
                f"head_dim: rotary position embeddings turn pairs of dimensions, so it must be even, got {self.head_dim}"
            )
        self.num_hidden_layers = len(self.pattern)
        for letter in sorted(set(self.pattern)):
            mixer = MIXERS[letter]
            name = section_of(letter)
            given = getattr(self, name) or {}
            if not isinstance(given, dict):
                raise ValueError(f"{name}: must be a mapping of settings, got {type(given).__name__}")
            defaults = mixer.default_settings(self)
            settings = {**defaults, **given}
            unknown_keys = sorted(set(settings) - set(defaults))
            if unknown_keys:
                raise ValueError(f"{name}.{unknown_keys[0]}: unknown setting; known: {sorted(defaults)}")
            mixer.check_kinds(settings, defaults)
            mixer.check_settings(settings, self)
            setattr(self, name, settings)
        if self.rope_parameters is not None and not isinstance(self.rope_parameters, dict):
            raise ValueError(
                f"rope_parameters: must be a mapping (rope_type, rope_theta, ...), got {self.rope_parameters!r}"
            )
        super().__post_init__(**kwargs)
        rope = self.rope_parameters or {}
        require_positive("rope_parameters.rope_theta", rope.get("rope_theta"), integer=False)
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":  # a scaled RoPE, as transformers computes it: every such type reads a factor
            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(
                    f"rope_parameters.rope_type: unknown {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}"
                )
            require_positive("rope_parameters.factor", rope.get("factor"), integer=False)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """config.json with `auto_map`, next to the code files it names (lctk.models.remote_code): the folder loads
        without `import lctk` through trust_remote_code."""
        from lctk.models.remote_code import AUTO_MAP, write_code_files

        self.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, **kwargs)
        write_code_files(save_directory)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        """Nothing to register: save_pretrained writes lctk's own auto_map. transformers calls this after loading
        through trust_remote_code; its default would make later saves copy lctk's source files into the folder."""
