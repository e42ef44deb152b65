"""The surface every mixer shares (ARCHITECTURE.md, "The model")."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from lctk.models.sequence import SequenceInfo


class MixerState:
    """Per-layer recurrent or KV state. Subclasses are dataclasses whose tensor fields have batch as dim 0."""

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def map_batch(self, fn) -> None:
        for name, tensor in self.tensors().items():
            setattr(self, name, fn(tensor))


class Mixer(nn.Module):
    section: str  # the config sub-section holding this mixer's settings
    layer_idx: int | None = None  # position in config.pattern, set by the block that holds the mixer

    def __init__(self, config, letter: str):
        super().__init__()
        self.letter = letter
        self.settings: dict[str, Any] = getattr(config, self.section)

    @classmethod
    def default_settings(cls, config) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def check_settings(cls, settings: dict[str, Any], config) -> None:
        """Raise ValueError naming `section.key` for an impossible setting."""

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixerState:
        raise NotImplementedError

    def state_size(self, seq_len: int) -> int:
        """Elements of inference state per sequence after seq_len tokens."""
        raise NotImplementedError

    def forward(self, hidden_states: Tensor, seq: SequenceInfo, state: MixerState | None = None) -> Tensor:
        raise NotImplementedError


def require_positive_int(section: str, settings: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{section}.{key}: must be a positive integer, got {value!r}")
