"""What decides a model's outputs, hashed: resumed eval samples are keyed on it, never on the model's path."""

from __future__ import annotations

import hashlib
import json

import torch

SAMPLED_VALUES = 1024  # per tensor, in weights_fingerprint


BITS_AS_INTEGERS = {1: torch.int8, 2: torch.int16, 4: torch.int32}  # element size -> integer dtype (else int64)


# config keys that do not change outputs (the dtype is fingerprinted from the tensors themselves)
NOT_FINGERPRINTED = ("_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype")


def weights_fingerprint(model) -> str:
    """A short hash of what decides a model's outputs, for resume keys: its config (less NOT_FINGERPRINTED: where
    it was loaded from and what saving adds) and, for every parameter and buffer, its name, shape, dtype, the sum of
    all its values' bits read as integers (exact, so the same on any device and thread count, and changed by any
    single edit) and SAMPLED_VALUES values at evenly spaced positions. One reduction pass over the weights on their
    own device plus a few thousand values copied to the host: well under a second per billion parameters on a GPU, a
    few seconds on a CPU. The same folder loaded at another dtype gives another fingerprint; a model trained in
    memory (the trainer's evals) gets one like any other."""
    config = getattr(model, "config", None)
    described = config.to_dict() if hasattr(config, "to_dict") else {}
    for bookkeeping in NOT_FINGERPRINTED:
        described.pop(bookkeeping, None)
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
    tensors = [*model.named_parameters(), *model.named_buffers()] if isinstance(model, torch.nn.Module) else []
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            bits = flat.view(BITS_AS_INTEGERS.get(flat.element_size(), torch.int64))
            count = min(bits.numel(), SAMPLED_VALUES)
            positions = torch.arange(count, device=bits.device) * max(bits.numel() - 1, 0) // max(count - 1, 1)
            total = int(bits.sum(dtype=torch.int64)) if bits.numel() else 0  # wraps around: still exact
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{total}|".encode())
            digest.update(bits[positions].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
