"""Titans (`T`): the chunked dual-form memory and the token step against a per-token recurrence with autograd
gradients written here; the memory recalls what it was written; the chunk layout and the window attention."""

import math

import pytest
import torch
import torch.nn.functional as F

from lctk import HybridConfig, HybridForCausalLM
from lctk.models.mixers.attention import window_attention
from lctk.models.mixers.fast_weights import ChunkGrid, pack, unpack
from lctk.models.mixers.titans import MemoryMLP, Titans, memory_chunk, memory_step
from lctk.models.sequence import build_sequence_info


def run_mlp(mats, x):
    """x + LayerNorm(MLP(x)) * (1 + gain) for one token, the gain a [D, 1] matrix."""
    hidden = x
    for layer, w in enumerate(mats[:-1]):
        hidden = w @ hidden
        if layer < len(mats) - 2:
            hidden = F.gelu(hidden)
    return x + F.layer_norm(hidden, hidden.shape, eps=1e-5) * (1 + mats[-1][:, 0])


def naive_memory(mlp, init, q, k, v, lr, momentum, keep, chunk, phase=0):
    """Token by token for one head: gradients at the chunk-start weights through autograd; the first chunk has
    `phase` slots used already."""
    start = unpack(init, mlp.shapes)
    weights, surprise = list(start), [torch.zeros_like(w) for w in start]
    outs = []
    for t in range(len(q)):
        params = [w.clone().requires_grad_() for w in start]
        loss = (run_mlp(params, k[t]) - v[t]).pow(2).mean()
        grads = torch.autograd.grad(loss, params)
        surprise = [momentum[t] * s - lr[t] * g for s, g in zip(surprise, grads)]
        weights = [keep[t] * w + s for w, s in zip(weights, surprise)]
        outs.append(run_mlp(weights, q[t]))
        if (phase + t + 1) % chunk == 0:
            start = list(weights)
    return torch.stack(outs), pack(start), pack(weights), pack(surprise)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_dual_form_chunks_match_the_per_token_recurrence(depth):
    torch.manual_seed(depth)
    dim, chunk, length, heads = 5, 4, 11, 2
    mlp = MemoryMLP(dim, depth, expand=2)
    init = torch.randn(1, heads, mlp.size, dtype=torch.float64) * 0.5
    q, v = torch.randn(2, 1, heads, length, dim, dtype=torch.float64).unbind(0)
    k = F.normalize(torch.randn(1, heads, length, dim, dtype=torch.float64), dim=-1)
    lr, momentum = torch.rand(2, 1, heads, length, dtype=torch.float64).unbind(0)
    keep = 1 - 0.3 * torch.rand(1, heads, length, dtype=torch.float64)

    # two dead slots first (a chunk continued from earlier calls) and three at the end: they change nothing
    def laid_out(x):
        x = torch.cat(
            [x.new_zeros(*x.shape[:2], 2, *x.shape[3:]), x, x.new_zeros(*x.shape[:2], 3, *x.shape[3:])], 2
        )
        return x.unflatten(2, (4, chunk))

    live = laid_out(torch.ones(1, 1, length, dtype=torch.bool))[:, 0]
    args = [laid_out(t) for t in (q, k, v, lr, momentum.log(), keep.log())]
    start, weights, surprise = init.clone(), init.clone(), torch.zeros_like(init)
    outs = []
    for c in range(4):
        out, start, weights, surprise = memory_chunk(
            mlp, start, weights, surprise, *[t[:, :, c] for t in args], live[:, c]
        )
        outs.append(out)
    got = torch.cat(outs, 2)[:, :, 2 : 2 + length]

    for h in range(heads):
        expected, exp_start, exp_weights, exp_surprise = naive_memory(
            mlp, init[0, h], q[0, h], k[0, h], v[0, h], lr[0, h], momentum[0, h], keep[0, h], chunk, phase=2
        )
        torch.testing.assert_close(got[0, h], expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(weights[0, h], exp_weights, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(surprise[0, h], exp_surprise, rtol=1e-9, atol=1e-9)
        # the sequence ends mid-chunk, so the chunk-start weights are those after token 3 * 4 - 2 - 1 = 9
        torch.testing.assert_close(start[0, h], exp_start, rtol=1e-9, atol=1e-9)


def test_memory_step_matches_the_recurrence():
    torch.manual_seed(0)
    mlp = MemoryMLP(4, 2, expand=2)
    init = torch.randn(1, 1, mlp.size, dtype=torch.float64)
    q, k, v = torch.randn(3, 1, 1, 4, dtype=torch.float64).unbind(0)
    lr, momentum, keep = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    surprise = torch.randn_like(init)
    out, weights, new_surprise = memory_step(
        mlp, init, init, surprise, q, k, v, lr.view(1, 1), momentum.log().view(1, 1), keep.log().view(1, 1)
    )
    params = [w.clone().requires_grad_() for w in unpack(init[0, 0], mlp.shapes)]
    grads = torch.autograd.grad((run_mlp(params, k[0, 0]) - v[0, 0]).pow(2).mean(), params)
    expected_surprise = momentum * surprise[0, 0] - lr * pack(list(grads))
    expected_weights = keep * init[0, 0] + expected_surprise
    torch.testing.assert_close(new_surprise[0, 0], expected_surprise)
    torch.testing.assert_close(weights[0, 0], expected_weights)
    torch.testing.assert_close(out[0, 0], run_mlp(unpack(expected_weights, mlp.shapes), q[0, 0]))


@pytest.mark.parametrize("chunk", [1, 8])
def test_memory_learns_what_it_was_written(chunk):
    """Written pairs read back closer after three passes of writes, whether each write sees the previous ones
    (chunk 1) or all see the chunk-start weights (chunk 8)."""
    torch.manual_seed(0)
    mlp = MemoryMLP(8, 2, expand=4)
    keys = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0].T[None, None]  # rows orthonormal
    values = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    init = pack([torch.randn(1, 1, r, c, dtype=torch.float64) / c**0.5 for r, c in mlp.shapes[:-1]] + [
        torch.zeros(1, 1, 8, 1, dtype=torch.float64)])
    state = (init, init, torch.zeros_like(init))
    ones, none = torch.ones(1, 1, chunk, dtype=torch.float64), torch.zeros(1, 1, chunk, dtype=torch.float64)
    error = lambda: (mlp(unpack(state[1], mlp.shapes), keys) - values).pow(2).mean()  # noqa: E731
    before = error()
    for c in range(3 * 8 // chunk):
        part = slice(c * chunk % 8, c * chunk % 8 + chunk)
        live = torch.ones(1, chunk, dtype=torch.bool)
        _, *state = memory_chunk(
            mlp, *state, keys[:, :, part], keys[:, :, part], values[:, :, part], 0.5 * ones, none - 30, none, live
        )
    assert error() < 0.7 * before


def test_chunk_grid_lays_out_documents_padding_and_cached_phase():
    # row 0: two documents (positions restart), row 1: two padding tokens then one document
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    seq = build_sequence_info(2, 6, 0, torch.device("cpu"), position_ids=positions, attention_mask=mask)
    absorbed = torch.tensor([5, 2])  # tokens of each row's current document seen by earlier calls
    grid = ChunkGrid.build(seq, 2, 6, chunk_size=4, absorbed=absorbed, aligned=True)
    assert grid.shape == (3, 2, 4)  # sequences: row 0 doc 0 (continues), row 0 doc 1, row 1 doc 0 (continues)
    x = torch.arange(1, 13).view(2, 6)
    laid = grid.to_grid(x)
    assert laid[0].tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]  # phase 5 % 4 = 1
    assert laid[1].tolist() == [[4, 5, 6, 0], [0, 0, 0, 0]]
    assert laid[2].tolist() == [[0, 0, 9, 10], [11, 12, 0, 0]]  # phase 2, padding left out
    assert torch.equal(grid.to_tokens(laid, 2, 6), x * mask)
    assert grid.completes().tolist() == [[True, False], [False, False], [True, False]]
    assert grid.absorbed_after(absorbed).tolist() == [3, 6]
    compact = ChunkGrid.build(seq, 2, 6, chunk_size=4, absorbed=absorbed, aligned=False)
    assert compact.to_grid(x)[2].tolist() == [[9, 10, 0], [11, 12, 0]]  # width 3: row 0 fills slots 0-2


def test_window_attention_matches_a_dense_reference():
    torch.manual_seed(0)
    batch, length, heads, dim, window = 2, 13, 2, 4, 4
    q, k, v = torch.randn(3, batch, length, heads, dim, dtype=torch.float64).unbind(0)
    persistent = torch.randn(2, 3, heads, dim, dtype=torch.float64)
    positions = torch.cat([torch.arange(6), torch.arange(7)]).expand(batch, -1)
    seq = build_sequence_info(batch, length, 0, q.device, position_ids=positions)
    out, (keys, _, seen) = window_attention(q, k, v, seq, window, None, persistent)

    t = torch.arange(length)
    doc = (t >= 6).long()
    allowed = (t[:, None] >= t[None]) & (t[:, None] - t[None] < window) & (doc[:, None] == doc[None])
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink_scores = torch.einsum("bthd,phd->bhtp", q, persistent[0]) / math.sqrt(dim)
    probs = torch.cat([sink_scores, scores], -1).softmax(-1)
    expected = torch.einsum("bhtp,phd->bthd", probs[..., :3], persistent[1]) + torch.einsum(
        "bhts,bshd->bthd", probs[..., 3:], v
    )
    torch.testing.assert_close(out, expected)
    assert keys.shape[1] == window - 1 and seen == length


def test_memory_parameters_take_no_weight_decay_and_variants_differ():
    config = HybridConfig(pattern="T", hidden_size=32, num_attention_heads=2, titans={"variant": "MAC"})
    mac = Titans(config, "T")
    assert mac.memory_init._no_weight_decay and mac.persistent._no_weight_decay
    assert mac.memory_init.shape == (2, 16 * 64 + 64 * 16 + 16)  # depth 2, expansion 4 on head_dim 16, the gain
    names = {
        v: {
            n
            for n, _ in Titans(
                HybridConfig(pattern="T", hidden_size=32, num_attention_heads=2, titans={"variant": v}), "T"
            ).named_parameters()
        }
        for v in ("MAC", "MAG", "MAL")
    }
    assert (
        "retrieved_kv.weight" in names["MAC"]
        and "memory_out.weight" in names["MAL"]
        and "attn_norm.weight" in names["MAG"]
        and "out_gate.weight" in names["MAL"]
    )


@pytest.mark.parametrize("variant", ["MAG", "MAC", "MAL"])
def test_default_memory_stays_finite_on_a_long_input(variant):
    """Without dividing theta by the chunk size, the chunk's 64 aligned steps overshot: NaN by 1024 tokens."""
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=97, pattern="T", hidden_size=256, num_attention_heads=4, titans={"variant": variant})
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 97, (1, 1024))).logits
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 100


def test_memory_stays_finite_with_theta_pinned_at_its_bound():
    """The default bound (2, on the chunk's mean gradient) with every theta at the bound; 4 gave NaN here."""
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=97, pattern="T", hidden_size=256, num_attention_heads=4, titans={"variant": "MAL"})
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mixer.gates.bias[:4] = 20.0  # sigmoid = 1: theta at its bound
        logits = model(torch.randint(0, 97, (1, 2048))).logits
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["titans-mag", "titans-mac", "titans-mal"])
def test_the_shipped_recipes_start_finite_at_2048_tokens(name):
    """Each Titans recipe's model (width 768, its first 3 of 12 layers: every layer is the same block) at
    initialisation: with the bound at 1/chunk_size MAG's second layer already gave NaN at 2048 tokens."""
    from pathlib import Path

    from lctk.recipe import load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path, kind="train")
    config = recipe.hybrid_config(32000)
    assert config.pattern == "T" * 12
    config.pattern, config.num_hidden_layers = "TTT", 3
    torch.manual_seed(0)
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.randint(0, 32000, (1, 2048))).logits
    assert torch.isfinite(logits).all()
