"""Shared pieces of the SSD tests: random inputs and an independent ground truth, the recurrence
S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t run one token at a time in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Case:
    batch: int = 1
    seq_len: int = 37
    n_groups: int = 1
    per_group: int = 1
    key_dim: int = 8
    value_dim: int = 6
    use_g: bool = True
    use_initial: bool = False
    cu_seqlens: tuple[int, ...] | None = None
    scale: float = 0.7

    @property
    def n_seqs(self) -> int:
        return self.batch if self.cu_seqlens is None else len(self.cu_seqlens) - 1


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 leaves: q, k, v, g (log-decay <= 0), initial_state, and random cotangents d_o, d_final."""
    gen = torch.Generator().manual_seed(seed)
    n_heads = case.n_groups * case.per_group
    shape_qk = (case.batch, case.seq_len, case.n_groups, case.key_dim)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    return dict(
        q=randn(*shape_qk, scale=0.5),
        k=randn(*shape_qk, scale=0.5),
        v=randn(case.batch, case.seq_len, n_heads, case.value_dim),
        g=(-0.3 * torch.rand(case.batch, case.seq_len, n_heads, generator=gen, dtype=torch.float64)).requires_grad_()
        if case.use_g
        else None,
        initial_state=randn(case.n_seqs, n_heads, case.key_dim, case.value_dim) if case.use_initial else None,
        d_o=torch.randn(case.batch, case.seq_len, n_heads, case.value_dim, generator=gen, dtype=torch.float64),
        d_final=torch.randn(case.n_seqs, n_heads, case.key_dim, case.value_dim, generator=gen, dtype=torch.float64),
    )


def sequential_ssd(q, k, v, g, scale, initial_state, cu_seqlens):
    """The recurrence token by token (float64). Returns (o [B, T, H, V], final states [N, H, K, V])."""
    batch, seq_len, n_groups, key_dim = q.shape
    n_heads, value_dim = v.shape[2:]
    q, k, v = (x.double() for x in (q, k, v))
    q = q.repeat_interleave(n_heads // n_groups, dim=2)
    k = k.repeat_interleave(n_heads // n_groups, dim=2)
    if cu_seqlens is None:  # every row is a sequence
        rows = [(b, 0, seq_len) for b in range(batch)]
    else:
        rows = [(0, start, end) for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    outputs = [[None] * seq_len for _ in range(batch)]
    finals = []
    for n, (b, start, end) in enumerate(rows):
        if initial_state is None:
            state = torch.zeros(n_heads, key_dim, value_dim, dtype=torch.float64)
        else:
            state = initial_state[n].double()
        for t in range(start, end):
            if g is not None:
                state = torch.exp(g[b, t].double())[:, None, None] * state
            state = state + k[b, t, :, :, None] * v[b, t, :, None, :]
            outputs[b][t] = scale * torch.einsum("hk,hkv->hv", q[b, t], state)
        finals.append(state)
    o = torch.stack([torch.stack(row) for row in outputs])
    return o, torch.stack(finals)


def outputs_and_grads(fn, inputs: dict, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Run fn(q, k, v, g, initial_state) -> (o, final) on copies of the inputs cast to dtype (g and the initial
    state stay float32 unless dtype is float64); returns float64 CPU outputs and the gradients of
    sum(o * d_o) + sum(final * d_final)."""
    names = [n for n in ("q", "k", "v", "g", "initial_state") if inputs[n] is not None]
    side_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {
        n: inputs[n].detach().to(device, dtype if n in ("q", "k", "v") else side_dtype).requires_grad_()
        for n in names
    }
    o, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("initial_state"))
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


def ground_truth(case: Case, seed: int = 0) -> tuple[dict, dict]:
    """(inputs, the sequential recurrence's outputs and gradients) for a case."""
    inputs = make_inputs(case, seed)
    cu = list(case.cu_seqlens) if case.cu_seqlens is not None else None
    truth = outputs_and_grads(lambda q, k, v, g, h0: sequential_ssd(q, k, v, g, case.scale, h0, cu), inputs, torch.float64)
    return inputs, truth


def run_ssd(ssd, case: Case, inputs: dict, dtype: torch.dtype, chunk_size: int, device: str = "cpu") -> dict:
    """The op under test through outputs_and_grads, with the case's scale and sequences."""
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, device=device)

    def call(q, k, v, g, h0):
        return ssd(q, k, v, g, scale=case.scale, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                   chunk_size=chunk_size)

    return outputs_and_grads(call, inputs, dtype, device)
