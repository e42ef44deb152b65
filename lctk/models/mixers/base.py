"""The surface every mixer shares."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from lctk.models.sequence import SequenceInfo


class MixerState:
    """Per-layer recurrent or KV state, held by lctk.models.cache.HybridCache. Subclasses are dataclasses whose
    tensor fields have batch as dim 0 (or implement tensors / map_batch themselves, as attention's buffer does).

    The contract a mixer follows (caches never copy per token):
    - `Mixer.init_state(batch, device, dtype)` allocates the state once; a state whose size grows with the sequence
      allocates lazily and implements `reserve(tokens)`, which the cache calls when it knows the final length
      (generate: prompt + max_new_tokens); fixed-size states inherit the no-op.
    - A single-token call outside autograd (a decode step) updates the state tensors in place (`copy_`, `mul_`,
      `addcmul_`: lctk.models.mixers.linear_recurrence.recurrent_step, lctk.models.layers.stateful_conv), so that they
      keep their address (what torch.compile and CUDA graphs need) and nothing is allocated per token. Longer calls, and
      any call under autograd, may rebind the fields to new tensors (a chunked scan returns a new state anyway, and a
      state carried through checkpointed segments must not be overwritten).
    - `map_batch(fn)` maps every batch-indexed tensor (beam reorder, row selection, repeat).
    """

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def map_batch(self, fn) -> None:
        for name, tensor in self.tensors().items():
            setattr(self, name, fn(tensor))

    def reserve(self, tokens: int) -> None:
        """The cache will hold `tokens` tokens in all: a state that grows with them may allocate for them now."""


class Mixer(nn.Module):
    section: str  # the config sub-section holding this mixer's settings
    layer_idx: int | None = None  # position in config.pattern, set by the block that holds the mixer
    # settings whose default does not tell their kind (per-layer lists, counts that may be 0): check_settings owns them
    special_settings: tuple[str, ...] = ()
    rotary: bool = False  # rotates q/k by the model's rotary embedding (pairs of dims: needs an even head_dim)

    def __init__(self, config, letter: str):
        super().__init__()
        self.letter = letter
        self.settings: dict[str, Any] = getattr(config, self.section)

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def check_kinds(cls, settings: dict[str, Any], defaults: dict[str, Any]) -> None:
        """Every setting is of its default's kind: true/false, a string, a positive integer (a size or count) or a
        positive finite number (a scale, rate or epsilon). Settings defaulting to None are left to check_settings."""
        for key, default in defaults.items():
            if default is None or key in cls.special_settings:
                continue
            name, value = f"{cls.section}.{key}", settings[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"{name}: must be true or false, got {value!r}")
            if isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{name}: must be a string, got {value!r}")
            if not isinstance(default, bool | str):
                require_positive(name, value, integer=isinstance(default, int))

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        """Raise ValueError naming `section.key` for an impossible setting (check_kinds has run)."""

    @classmethod
    def context_parallel_problem(cls, config, shard_length: int) -> str | None:
        """Why this mixer cannot run on rows split into shards of shard_length tokens (lctk.parallel.context), or
        None when it can."""
        return None

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:
        """Elements of inference state per sequence after seq_len tokens."""
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: MixerState | None = None) -> Tensor:
        raise NotImplementedError


def short_shard(letter: str, needed: int, what: str, shard_length: int) -> str | None:
    """The problem of shards shorter than the `needed` tokens a mixer takes from the previous shard, or None."""
    if needed <= shard_length:
        return None
    return f"`{letter}` takes {what} = {needed} tokens from the previous shard, more than a shard's {shard_length}"


def require_positive(name: str, value: Any, integer: bool) -> None:
    """`value` is a positive integer (integer=True) or a positive finite number; ValueError naming `name` if not."""
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 or not (integer or math.isfinite(value)):
        raise ValueError(f"{name}: must be {'a positive integer' if integer else 'a positive finite number'}, got {value!r}")
