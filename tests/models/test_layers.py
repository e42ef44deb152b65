"""Shared layers: the gated norm recomputed in backward gives the plain computation's output and gradients."""

from __future__ import annotations

import torch

from lctk.models.layers import GatedRMSNorm


def test_gated_norm_recomputed_in_backward_matches_the_plain_graph():
    torch.manual_seed(0)
    norm = GatedRMSNorm(12, n_groups=3)
    torch.nn.init.normal_(norm.weight)
    x, z = torch.randn(2, 5, 12, requires_grad=True), torch.randn(2, 5, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = norm(x, z)
    plain = norm._norm(x, z)
    inputs = {x.untyped_storage().data_ptr(), z.untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in saved} <= inputs  # the rest is recomputed from the inputs
    torch.testing.assert_close(ours, plain)
    grad = torch.randn_like(ours)
    got = torch.autograd.grad(ours, (x, z, norm.weight), grad)
    want = torch.autograd.grad(plain, (x, z, norm.weight), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(norm(x, z), plain)
