"""LaCT (`L`): the chunked fast-weight path against a loop written here with autograd gradients;
apply-then-update order; Newton-Schulz; row norms; parameters without weight decay."""

import pytest
import torch
import torch.nn.functional as F

from lctk import HybridConfig, HybridForCausalLM
from lctk.models.mixers.fast_weights import unpack
from lctk.models.mixers.lact import LaCT, newton_schulz
from lctk.models.sequence import build_sequence_info


def make_lact(**settings) -> LaCT:
    torch.manual_seed(0)
    config = HybridConfig(
        pattern="L", hidden_size=16, num_attention_heads=2, lact={"num_heads": 2, "expand": 2, **settings}
    )
    return LaCT(config, "L").double()


def inputs(batch: int, length: int, heads: int = 2, dim: int = 8):
    torch.manual_seed(1)
    q, k, v = torch.randn(3, batch, length, heads, dim, dtype=torch.float64).unbind(0)
    lr = torch.rand(batch, length, heads, 3, dtype=torch.float64) * 0.5
    momentum = torch.rand(batch, length, heads, dtype=torch.float64)
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, lr, momentum


def swiglu(mats, x):
    w0, w1, w2 = mats
    return w1 @ (F.silu(w0 @ x) * (w2 @ x))


def naive_fast_weights(mixer, head, q, k, v, lr, momentum):
    """One sequence, one head: q, k, v [T, D], lr [T, 3], momentum [T]."""
    init = unpack(mixer.fast_init[head].detach(), mixer.shapes)
    weights, previous = list(init), None
    chunk, outs = mixer.chunk_size, []
    for start in range(0, len(q), chunk):
        part = slice(start, start + chunk)
        outs += [swiglu(weights, x) for x in q[part]]
        grads = []
        for j in range(
            3
        ):  # W_j's step uses its own learning rates: the gradient of sum_t lr_tj <f(k_t), v_t>
            params = [w.clone().requires_grad_() for w in weights]
            score = sum(
                rate[j] * swiglu(params, key) @ value for key, value, rate in zip(k[part], v[part], lr[part])
            )
            grads.append(torch.autograd.grad(score, params[j])[0])
        if mixer.use_momentum:
            if previous is not None:
                grads = [g + momentum[part].mean() * p for g, p in zip(grads, previous)]
            previous = grads
        if mixer.use_muon:
            grads = [newton_schulz(g) for g in grads]
        weights = [w + g for w, g in zip(weights, grads)]
        weights = [
            w / (w.norm(dim=-1, keepdim=True) + 1e-5) * w0.norm(dim=-1, keepdim=True)
            for w, w0 in zip(weights, init)
        ]
    return torch.stack(outs)


@pytest.mark.parametrize("momentum, muon", [(False, False), (True, False), (True, True)])
def test_chunks_match_a_loop_with_autograd_gradients(momentum, muon):
    mixer = make_lact(chunk_size=4, momentum=momentum, muon=muon)
    q, k, v, lr, coeff = inputs(1, 14)
    with torch.no_grad():
        out = mixer._fast_weights(
            q, k, v, lr, coeff if momentum else None, build_sequence_info(1, 14, 0, q.device), None
        )
    head = 1
    expected = naive_fast_weights(
        mixer, head, q[0, :, head], k[0, :, head], v[0, :, head], lr[0, :, head], coeff[0, :, head]
    )
    torch.testing.assert_close(out[0, :, head], expected, rtol=1e-7, atol=1e-9)


def test_each_chunk_reads_only_earlier_chunks():
    mixer = make_lact(chunk_size=4)
    q, k, v, lr, coeff = inputs(1, 12)
    seq = build_sequence_info(1, 12, 0, q.device)
    with torch.no_grad():
        before = mixer._fast_weights(q, k, v, lr, coeff, seq, None)
        k2, v2 = k.clone(), v.clone()
        k2[:, 4:8], v2[:, 4:8] = torch.randn_like(k2[:, 4:8]), torch.randn_like(v2[:, 4:8])
        after = mixer._fast_weights(q, k2, v2, lr, coeff, seq, None)
    torch.testing.assert_close(after[:, :8], before[:, :8])  # chunk 1's writes only reach chunk 2
    assert not torch.allclose(after[:, 8:], before[:, 8:])


def test_updates_keep_the_initial_row_norms():
    mixer = make_lact(chunk_size=4, muon=True)
    q, k, v, lr, coeff = inputs(2, 9)
    state = mixer.init_state(2, q.device, q.dtype)
    with torch.no_grad():
        mixer._fast_weights(q, k, v, lr, coeff, build_sequence_info(2, 9, 0, q.device), state)
    assert state.absorbed.tolist() == [9, 9] and not torch.equal(state.weights[0], mixer.fast_init)
    for now, first in zip(
        unpack(state.weights, mixer.shapes), unpack(mixer.fast_init.detach(), mixer.shapes)
    ):
        torch.testing.assert_close(
            now.norm(dim=-1), first.norm(dim=-1).expand_as(now.norm(dim=-1)), rtol=1e-4, atol=0
        )  # up to the 1e-5 guard


@pytest.mark.parametrize("shape", [(6, 6), (4, 9), (9, 4)])
def test_newton_schulz_orthogonalises(shape):
    torch.manual_seed(0)
    g = torch.randn(3, *shape, dtype=torch.float64)
    singular = torch.linalg.svdvals(newton_schulz(g))
    assert singular.min() > 0.6 and singular.max() < 1.25  # the quintic's band around 1
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    cosine = (newton_schulz(g) * (u @ vh)).sum((-2, -1)) / (u @ vh).norm(dim=(-2, -1)) ** 2
    assert (cosine > 0.85).all()  # close to U V^T


def test_fast_weight_parameters_take_no_weight_decay():
    mixer = make_lact()
    assert all(p._no_weight_decay for p in (mixer.fast_init, mixer.qk_scale, mixer.qk_offset))
    assert mixer.fast_init.shape == (2, 3 * 8 * 16)  # W0, W1, W2 of 8 x 16 per head (expand 2)


def test_initial_fast_weights_are_low_rank_plus_half_identity_by_default():
    config = HybridConfig(pattern="L", hidden_size=128, num_attention_heads=2, lact={"num_heads": 1})
    mixer = LaCT(config, "L")
    w0, w1, w2 = unpack(mixer.fast_init.detach(), mixer.shapes)
    for w in (w0, w2):  # 128 x 128 = rank-32 product + 0.5 I
        assert torch.linalg.matrix_rank(w[0] - 0.5 * torch.eye(128)) == 32
    assert torch.linalg.matrix_rank(w1[0]) == 128
    config = HybridConfig(pattern="L", hidden_size=128, num_attention_heads=2, lact={"num_heads": 1, "init_rank": None})
    full = LaCT(config, "L")
    assert torch.linalg.matrix_rank(unpack(full.fast_init.detach(), full.shapes)[0][0] - 0.5 * torch.eye(128)) == 128


def test_fast_weight_rope_is_on_by_default_and_ttt_nope_leaves_it_out():
    torch.manual_seed(0)
    outputs = {}
    for nope in (False, True):
        config = HybridConfig(vocab_size=50, pattern="L", hidden_size=32, num_attention_heads=2,
                              lact={"num_heads": 2, "chunk_size": 4, "window": 2, "ttt_nope": nope})
        torch.manual_seed(0)
        model = HybridForCausalLM(config).eval()
        with torch.no_grad():
            outputs[nope] = model(torch.arange(12).view(1, 12) % 50).logits
    assert not torch.allclose(outputs[False], outputs[True])
