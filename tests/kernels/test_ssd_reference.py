"""The torch path of lctk.kernels.ssd (reference.py, the CPU training path) against the sequential recurrence."""

import pytest
import torch
from ssd_testing import Case, assert_close, ground_truth, run_ssd, sequential_ssd

import lctk.kernels.ssd.reference as reference
from lctk.kernels.ssd import ssd, ssd_step

CASES = {
    "odd_T_chunk16": (Case(batch=2, seq_len=37), 16),
    "odd_T_chunk64": (Case(batch=2, seq_len=37, use_initial=True), 64),
    "groups_chunk16": (Case(seq_len=50, n_groups=2, per_group=3, use_initial=True), 16),
    "heads_no_groups": (Case(seq_len=32, n_groups=3, per_group=1), 16),
    "no_decay": (Case(seq_len=41, per_group=2, use_g=False, use_initial=True), 16),
    "cu_seqlens": (Case(seq_len=50, n_groups=2, per_group=2, use_initial=True, cu_seqlens=(0, 7, 7, 30, 50)), 16),
    "cu_seqlens_chunk64": (Case(seq_len=90, per_group=2, cu_seqlens=(0, 20, 85, 90)), 64),
    "T_shorter_than_chunk": (Case(seq_len=5, use_initial=True), 64),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_sequential_recurrence(name):
    case, chunk_size = CASES[name]
    inputs, truth = ground_truth(case)
    assert_close(run_ssd(ssd, case, inputs, torch.float32, chunk_size), truth, rtol=2e-5)


def test_blocks_of_chunks_do_not_change_the_result(monkeypatch):
    """Long inputs are processed a block of chunks at a time; blocks of one chunk give the same answer."""
    case = Case(batch=2, seq_len=45, per_group=2, use_initial=True)
    inputs, truth = ground_truth(case)
    monkeypatch.setattr(reference, "_BLOCK_TOKENS", 16)
    assert_close(run_ssd(ssd, case, inputs, torch.float32, 16), truth, rtol=2e-5)
    case = Case(seq_len=45, cu_seqlens=(0, 3, 40, 45))
    inputs, truth = ground_truth(case)
    assert_close(run_ssd(ssd, case, inputs, torch.float32, 8), truth, rtol=2e-5)


def test_float64_is_exact_and_bfloat16_keeps_its_dtype():
    case = Case(seq_len=30, per_group=2, use_initial=True)
    inputs, truth = ground_truth(case)
    assert_close(run_ssd(ssd, case, inputs, torch.float64, 16), truth, rtol=1e-12)
    q, k, v = (inputs[n].detach().bfloat16() for n in "qkv")
    h0 = inputs["initial_state"].detach().float()
    o, final = ssd(q, k, v, inputs["g"].detach().float(), scale=case.scale, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert_close({"o": o.double(), "final": final.double()}, {n: truth[n] for n in ("o", "final")}, rtol=3e-2)


def test_only_the_final_state_gets_a_gradient():
    """A prefill whose outputs are dropped: gradients flow from the final state alone."""
    case = Case(seq_len=20, use_initial=True)
    inputs, _ = ground_truth(case)
    q, k, v, g, h0 = (inputs[n].detach().requires_grad_() for n in ("q", "k", "v", "g", "initial_state"))
    _, final = ssd(q, k, v, g, initial_state=h0, output_final_state=True, chunk_size=16)
    final.sum().backward()
    q2, k2, v2, g2, h02 = (x.detach().requires_grad_() for x in (q, k, v, g, h0))
    sequential_ssd(q2, k2, v2, g2, 1.0, h02, None)[1].sum().backward()
    for ours, theirs in ((k, k2), (v, v2), (g, g2), (h0, h02)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-9)
    assert q.grad.abs().max() == 0


def test_decode_steps_continue_a_chunked_prefill():
    case = Case(batch=2, seq_len=24, n_groups=2, per_group=2)
    inputs, _ = ground_truth(case)
    q, k, v, g = (inputs[n].detach().float() for n in ("q", "k", "v", "g"))
    full, _ = ssd(q, k, v, g, scale=0.5)
    prefix, state = ssd(q[:, :17], k[:, :17], v[:, :17], g[:, :17], scale=0.5, output_final_state=True, chunk_size=16)
    steps = [prefix]
    for t in range(17, 24):
        o, state = ssd_step(q[:, t], k[:, t], v[:, t], g[:, t], state, scale=0.5)
        steps.append(o.unsqueeze(1))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k=torch.zeros(1, 8, 2, 3)), "q and k must both be"),
        (dict(v=torch.zeros(1, 8, 3, 5)), "H a multiple of Hk"),
        (dict(v=torch.zeros(1, 7, 4, 5)), "v must be"),
        (dict(g=torch.zeros(1, 8, 2)), "g must be"),
        (dict(v=torch.zeros(1, 8, 4, 5, dtype=torch.float64)), "share one floating dtype"),
        (dict(initial_state=torch.zeros(2, 4, 4, 5)), "initial_state must be"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7])), "rise from 0 to T=8"),
        (dict(cu_seqlens=torch.tensor([0.0, 8.0])), "int32/int64"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(initial_state=torch.zeros(1, 4, 4, 5, device="meta")), "is on meta"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(q=torch.zeros(1, 8, 2, 4), k=torch.zeros(1, 8, 2, 4), v=torch.zeros(1, 8, 4, 5), g=None)
    kwargs = {}
    for name, value in change.items():
        (args if name in args else kwargs)[name] = value
    with pytest.raises(ValueError, match=message):
        ssd(*args.values(), **kwargs)


def test_cu_seqlens_needs_one_row():
    q = torch.zeros(2, 8, 1, 4)
    with pytest.raises(ValueError, match="batch of one row"):
        ssd(q, q, torch.zeros(2, 8, 1, 4), cu_seqlens=torch.tensor([0, 8]))


def test_decode_step_checks_shapes():
    q = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="state must be"):
        ssd_step(q, q, torch.zeros(2, 2, 3), None, torch.zeros(2, 2, 3, 4))
