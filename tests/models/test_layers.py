"""Shared layers: the gated norm recomputed in backward gives the plain computation's output and gradients; the
mixers' short convolution is torch's conv1d per document and continues from its state."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lctk.models.layers import GatedRMSNorm, short_conv
from lctk.models.sequence import SequenceInfo, document_index


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


def test_short_conv_is_conv1d_per_document_and_continues_from_its_state():
    torch.manual_seed(0)
    channels, kernel, lengths = 6, 4, [3, 7]
    weight, bias = torch.randn(channels, kernel), torch.randn(channels)
    x = torch.randn(1, sum(lengths), channels)

    def alone(doc):  # [T, D]: the document with nothing before it
        return F.silu(F.conv1d(F.pad(doc.T, (kernel - 1, 0)), weight.unsqueeze(1), bias, groups=channels).T)

    expected = torch.cat([alone(doc) for doc in x[0].split(lengths)]).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed = short_conv(x, weight, bias, SequenceInfo(positions, seq_idx=document_index(positions)))
    torch.testing.assert_close(packed, expected)

    second = x[:, lengths[0] :]  # fed as a prefill of 4 tokens, then one token at a time
    state = SimpleNamespace(conv=torch.zeros(1, kernel - 1, channels))
    address = state.conv.data_ptr()
    with torch.no_grad():
        pieces = [short_conv(second[:, :4], weight, bias, SequenceInfo(torch.arange(4)[None]), state)]
        pieces += [short_conv(second[:, t : t + 1], weight, bias, SequenceInfo(torch.tensor([[t]])), state)
                   for t in range(4, lengths[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected[:, lengths[0] :])
    assert state.conv.data_ptr() == address  # outside autograd the state is written in place, prefill included
    torch.testing.assert_close(state.conv, second[:, -(kernel - 1) :])

    carried = state.conv.clone()  # under autograd the state is rebound: the tensor a checkpoint kept stays as it was
    kept = state.conv
    short_conv(second[:, :2], weight.requires_grad_(), bias, SequenceInfo(torch.arange(7, 9)[None]), state)
    assert state.conv is not kept and torch.equal(kept, carried)
