"""The torch path of lctk.kernels.delta (the chunked WY/UT form, the CPU training path) against the token-by-token
recurrence, and the recurrence against the papers' matrix form."""

import pytest
import torch
from delta_testing import Case, assert_close, ground_truth, make_inputs, run_delta

import lctk.kernels.delta.reference as reference
from lctk.kernels.delta import delta_recurrent, delta_rule, delta_step

CASES = {
    "scalar_odd_T_chunk16": (Case(batch=2, seq_len=37), 16),
    "scalar_initial_chunk64": (Case(batch=2, seq_len=37, use_initial=True), 64),
    "channel_odd_T_chunk16": (Case(batch=2, seq_len=37, decay="channel", use_initial=True), 16),
    "channel_sub_blocks_chunk64": (Case(seq_len=70, decay="channel", use_initial=True), 64),
    "no_decay": (Case(seq_len=41, decay=None, use_initial=True), 16),
    "cu_seqlens_scalar": (Case(seq_len=50, use_initial=True, cu_seqlens=(0, 7, 7, 30, 50)), 16),
    "cu_seqlens_channel": (Case(seq_len=50, decay="channel", use_initial=True, cu_seqlens=(0, 7, 7, 30, 50)), 8),
    "T_shorter_than_chunk": (Case(seq_len=5, decay="channel", use_initial=True), 64),
}


@pytest.mark.parametrize("name", CASES)
def test_chunks_match_the_recurrence_forward_and_backward(name):
    case, chunk_size = CASES[name]
    inputs, truth = ground_truth(case)
    assert_close(run_delta(delta_rule, case, inputs, torch.float32, chunk_size), truth, rtol=2e-5)


def test_channels_that_forget_at_once_neither_overflow_nor_drift():
    """Log-decays down to -60 per token (exp(-G) would overflow fp32 within two tokens): exact in float64 across
    sub-blocks of a 64-token chunk; in float32 the cumulative log-decay itself (~-2400 here) carries ~1e-4 absolute
    rounding, which bounds the agreement."""
    case = Case(seq_len=40, decay="channel", decay_rate=60.0, use_initial=True)
    inputs, truth = ground_truth(case)
    assert_close(run_delta(delta_rule, case, inputs, torch.float64, 64), truth, rtol=1e-12)
    assert_close(run_delta(delta_rule, case, inputs, torch.float32, 64), truth, rtol=1e-4)


def test_recurrence_is_the_papers_matrix_form():
    """S_t = S_{t-1} Diag(a_t) (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t, with S [V, K] (the op's state is
    its transpose): per-channel and scalar decays."""
    for decay in ("channel", "scalar"):
        case = Case(seq_len=9, heads=1, key_dim=4, value_dim=3, decay=decay, use_initial=True, scale=1.0)
        x = {n: t.detach() if t is not None else None for n, t in make_inputs(case).items()}
        o, final = delta_recurrent(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
        S = x["initial_state"][0, 0].T  # [V, K]
        for t in range(case.seq_len):
            q, k, v, b = x["q"][0, t, 0], x["k"][0, t, 0], x["v"][0, t, 0], x["beta"][0, t, 0]
            a = torch.exp(x["g"][0, t, 0]) * torch.ones(4, dtype=torch.float64)
            S = S @ torch.diag(a) @ (torch.eye(4, dtype=torch.float64) - b * torch.outer(k, k)) + b * torch.outer(v, k)
            torch.testing.assert_close(o[0, t, 0], S @ q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final[0, 0], S.T, rtol=1e-12, atol=1e-12)


def test_blocks_of_chunks_do_not_change_the_result(monkeypatch):
    """Per-channel decay products are formed a block of chunks at a time; blocks of one chunk give the same answer."""
    case = Case(batch=2, seq_len=45, decay="channel", use_initial=True)
    inputs, truth = ground_truth(case)
    monkeypatch.setattr(reference, "_PAIR_ELEMENTS", 1)
    assert_close(run_delta(delta_rule, case, inputs, torch.float32, 32), truth, rtol=2e-5)


def test_float64_is_exact_and_bfloat16_keeps_its_dtype():
    case = Case(seq_len=30, decay="channel", use_initial=True)
    inputs, truth = ground_truth(case)
    assert_close(run_delta(delta_rule, case, inputs, torch.float64, 16), truth, rtol=1e-12)
    q, k, v = (inputs[n].detach().bfloat16() for n in "qkv")
    g, beta, h0 = (inputs[n].detach().float() for n in ("g", "beta", "initial_state"))
    o, final = delta_rule(q, k, v, g, beta, scale=case.scale, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close({"o": o.double(), "final": final.double()}, {n: truth[n] for n in ("o", "final")}, rtol=3e-2)


def test_only_the_final_state_gets_a_gradient():
    """A prefill whose outputs are dropped: gradients flow from the final state alone."""
    case = Case(seq_len=20, use_initial=True)
    inputs = make_inputs(case)
    leaves = [inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "g", "beta", "initial_state")]
    _, final = delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True, chunk_size=16)
    final.sum().backward()
    twins = [x.detach().requires_grad_() for x in leaves]
    delta_recurrent(*twins[:5], initial_state=twins[5])[1].sum().backward()
    for ours, theirs in zip(leaves[1:], twins[1:]):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-9)
    assert leaves[0].grad is None or not leaves[0].grad.any()  # q only reads the state


@pytest.mark.parametrize("decay", ["scalar", "channel"])
def test_decode_steps_update_the_state_in_place_and_continue_a_prefill(decay):
    case = Case(batch=2, seq_len=24, decay=decay)
    x = {n: t.detach().float() if t is not None else None for n, t in make_inputs(case).items()}
    q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
    full, _ = delta_rule(q, k, v, g, beta, scale=0.5)
    prefix, state = delta_rule(q[:, :17], k[:, :17], v[:, :17], g[:, :17], beta[:, :17], scale=0.5,
                               output_final_state=True, chunk_size=16)
    buffer = state.data_ptr()
    steps = [prefix] + [delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale=0.5).unsqueeze(1)
                        for t in range(17, 24)]
    assert state.data_ptr() == buffer
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    _, expected = delta_rule(q, k, v, g, beta, output_final_state=True)
    torch.testing.assert_close(state, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=torch.zeros(1, 8, 2, 3)), "q and k must both be"),
        (dict(v=torch.zeros(1, 8, 3, 5)), "v must be"),
        (dict(g=torch.zeros(1, 8, 3)), "g must be"),
        (dict(g=torch.zeros(1, 8, 2, 5)), "g must be"),
        (dict(beta=torch.zeros(1, 8, 2, 1)), "beta must be"),
        (dict(v=torch.zeros(1, 8, 2, 5, dtype=torch.float64)), "share one floating dtype"),
        (dict(initial_state=torch.zeros(2, 2, 4, 5)), "initial_state must be"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), "rise from 0 to T=8"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "int32/int64"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(beta=torch.zeros(1, 8, 2, device="meta")), "is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(q=torch.zeros(1, 8, 2, 4), k=torch.zeros(1, 8, 2, 4), v=torch.zeros(1, 8, 2, 5), g=None,
                beta=torch.zeros(1, 8, 2))
    kwargs = {}
    for name, value in change.items():
        (args if name in args else kwargs)[name] = value
    with pytest.raises(ValueError, match=message):
        delta_rule(*args.values(), **kwargs)


def test_decode_step_checks_shapes():
    q = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="state must be"):
        delta_step(q, q, torch.zeros(2, 1, 3), None, torch.zeros(2, 1), torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="beta must be"):
        delta_step(q, q, torch.zeros(2, 1, 3), None, torch.zeros(2, 4), torch.zeros(2, 1, 4, 3))
