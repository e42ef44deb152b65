"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

No weight decay on: norms (a parameter whose name contains "norm"), biases (names ending in "bias": Linear biases,
conv_bias, dt_bias), Mamba-2's A_log and D, and any parameter a mixer marks with `param._no_weight_decay = True`.
Mixers with other special parameters either set that attribute or add their names to NO_DECAY_NAMES.

Schedules give the learning rate at step s (0-based) of S steps, after a linear warmup over W steps
(lr * (s + 1) / W), with p = (s - W) / (S - W) the progress after warmup and m = min_lr_ratio:
    cosine    m + (1 - m) (1 + cos(pi p)) / 2
    linear    1 - (1 - m) p
    constant  1
    wsd       1 until p = 1 - decay_fraction, then linear down to m (warmup-stable-decay)
The rate is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = {"A_log", "D"}  # parameter names (last component) besides norms and biases


def decays(name: str, parameter: nn.Parameter) -> bool:
    last = name.rsplit(".", 1)[-1]
    if getattr(parameter, "_no_weight_decay", False) or last in NO_DECAY_NAMES or last.endswith("bias"):
        return False
    return "norm" not in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed and not decayed."""
    decayed, kept = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decayed if decays(name, parameter) else kept).append(parameter)
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, train) -> torch.optim.Optimizer:
    groups = [group for group in param_groups(model, train.weight_decay) if group["params"]]
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), eps=train.eps)


def lr_factor(step: int, total_steps: int, train) -> float:
    warmup = min(train.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total_steps - warmup, 1)
    floor = train.min_lr_ratio
    if train.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if train.schedule == "linear":
        return 1 - (1 - floor) * progress
    if train.schedule == "wsd":
        stable = 1 - train.decay_fraction
        return 1.0 if progress <= stable else 1 - (1 - floor) * (progress - stable) / train.decay_fraction
    return 1.0
