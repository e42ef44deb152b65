"""Training labels (Hugging Face convention): IGNORE marks a position that is no target, and labels are unshifted,
so the target of position t is labels[t + 1]. One definition for the data, the losses and context parallelism."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # transformers' and torch's cross-entropy ignore_index


def shifted_targets(labels: Tensor) -> Tensor:
    """[B, T]: the target of position t is labels[t+1]; IGNORE at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)
