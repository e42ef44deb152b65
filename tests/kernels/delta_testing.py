"""Shared pieces of the delta-rule tests: random inputs, and the ground truth: the token-by-token recurrence of
lctk.kernels.delta.reference in float64, its gradients by autograd."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lctk.kernels.delta import delta_recurrent


@dataclass
class Case:
    batch: int = 1
    seq_len: int = 37
    heads: int = 2
    key_dim: int = 8
    value_dim: int = 6
    decay: str | None = "scalar"  # "scalar" (Gated DeltaNet), "channel" (KDA) or None
    use_initial: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    scale: float = 0.7
    decay_rate: float = 0.5  # the log-decay per token is -decay_rate * U[0, 1)

    @property
    def n_seqs(self) -> int:
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1


NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 leaves (unit-norm q, k as the mixers pass them; b in (0, 1)), and random cotangents d_o, d_final."""
    gen = torch.Generator().manual_seed(seed)
    qk_shape = (case.batch, case.seq_len, case.heads, case.key_dim)

    def leaf(x):
        return x.requires_grad_()

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    g_shape = {"scalar": qk_shape[:3], "channel": qk_shape, None: None}[case.decay]
    return dict(
        q=leaf(F.normalize(randn(*qk_shape), dim=-1)),
        k=leaf(F.normalize(randn(*qk_shape), dim=-1)),
        v=leaf(randn(case.batch, case.seq_len, case.heads, case.value_dim)),
        g=None if g_shape is None else leaf(-case.decay_rate * torch.rand(*g_shape, generator=gen, dtype=torch.float64)),
        beta=leaf(torch.rand(*qk_shape[:3], generator=gen, dtype=torch.float64)),
        initial_state=leaf(randn(case.n_seqs, case.heads, case.key_dim, case.value_dim)) if case.use_initial else None,
        d_o=randn(case.batch, case.seq_len, case.heads, case.value_dim),
        d_final=randn(case.n_seqs, case.heads, case.key_dim, case.value_dim),
    )


def outputs_and_grads(fn, inputs: dict, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Run fn(q, k, v, g, beta, initial_state) -> (o, final) on copies of the inputs, q/k/v cast to dtype (g, beta and
    the initial state float32 unless dtype is float64); returns float64 CPU outputs and the gradients of
    sum(o * d_o) + sum(final * d_final)."""
    names = [n for n in NAMES if inputs[n] is not None]
    side = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {n: inputs[n].detach().to(device, dtype if n in "qkv" else side).requires_grad_() for n in names}
    o, final = fn(*(leaves.get(n) for n in NAMES))
    loss = (o.double() * inputs["d_o"].to(device)).sum() + (final.double() * inputs["d_final"].to(device)).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    result = {"o": o.detach().double().cpu(), "final": final.detach().double().cpu()}
    result.update({f"d{n}": grad.double().cpu() for n, grad in zip(names, grads)})
    return result


def assert_close(actual: dict, expected: dict, rtol: float) -> None:
    """Every entry within rtol of the expected one, relative to the expected entry's largest magnitude."""
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp(min=1e-6)
        error = (actual[name] - expected[name]).abs().max() / scale
        assert error <= rtol, f"{name}: relative error {error:.2e} > {rtol:.0e}"


def _cu(case: Case, device: str = "cpu") -> torch.Tensor | None:
    return None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, device=device)


def ground_truth(case: Case, seed: int = 0) -> tuple[dict, dict]:
    """(inputs, the float64 recurrence's outputs and gradients)."""
    inputs = make_inputs(case, seed)

    def recurrence(q, k, v, g, beta, h0):
        return delta_recurrent(q, k, v, g, beta, scale=case.scale, initial_state=h0, cu_seqlens=_cu(case))

    return inputs, outputs_and_grads(recurrence, inputs, torch.float64)


def run_delta(delta_rule, case: Case, inputs: dict, dtype: torch.dtype, chunk_size: int, device: str = "cpu") -> dict:
    """The chunked op under test through outputs_and_grads, with the case's scale and sequences."""

    def call(q, k, v, g, beta, h0):
        return delta_rule(q, k, v, g, beta, scale=case.scale, initial_state=h0, output_final_state=True,
                          cu_seqlens=_cu(case, device), chunk_size=chunk_size)

    return outputs_and_grads(call, inputs, dtype, device)
