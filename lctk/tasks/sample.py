"""The one sample type every text task returns, and the seeded random source each sample is drawn from."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One prompt built to an exact token budget.

    length: the budget in tokens for prompt + answer; the prompt has at most `length - reserve` tokens (a few under
    at most). input_ids are exactly `tokenizer(prompt)["input_ids"]` (special tokens included). answers: strings the
    model's continuation must contain (all of them for full credit). target: the canonical continuation, for
    training data (`prompt + target` is a well-formed example; its tokens fit in `reserve` for the default tasks)."""

    task: str
    length: int
    reserve: int
    prompt: str
    input_ids: np.ndarray
    answers: tuple[str, ...]
    target: str
    depth: float | None = None
    offsets: np.ndarray | None = None  # (n, 2) character span of each token in `prompt`, where the tokenizer gives them
    meta: dict = field(default_factory=dict)


def sample_rng(*parts: object) -> random.Random:
    """A random source determined by the parts (task, length, depth, index, seed): the same sample on every run,
    machine and Python process (no dependence on hash randomisation)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))
