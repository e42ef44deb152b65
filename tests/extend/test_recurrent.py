"""Recurrent length generalisation: the Mamba-2 settings against independent references, cache and document
behaviour with them on, bounded states on a long stress input, calibration, round trip, and bad input."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from lctk import HybridConfig, HybridForCausalLM
from lctk.errors import UserError
from lctk.extend.recurrent import apply_recurrent, calibrate_dt_scales, max_state_norms
from lctk.models import HybridCache
from lctk.models.mixers.mamba2_length_generalisation import capped_scan, windowed_scan
from lctk.models.sequence import build_sequence_info

VOCAB = 61


def tiny_model(pattern="MAM", seed=0, **mamba2) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(
        pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, max_position_embeddings=32,
        mamba2={"state_size": 8, "head_dim": 16, "n_groups": 2, "chunk_size": 8, **mamba2},
    )
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def assert_close(actual, expected, tol=1e-4):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, f"max error {(actual - expected).abs().max():.3e}"


def recurrence_inputs(batch=2, length=37, groups=2, heads=4, n=5, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(batch, length, groups, n, generator=gen), torch.randn(batch, length, groups, n, generator=gen)
    v = torch.randn(batch, length, heads, p, generator=gen)
    g = -torch.rand(batch, length, heads, generator=gen) * 0.3
    return q, k, v, g


def naive_states(q, k, v, g):
    """All states h_t = exp(g_t) h_{t-1} + k_t v_t^T, one token at a time: [B, T, H, N, P]."""
    repeat = v.shape[2] // k.shape[2]
    k = k.repeat_interleave(repeat, 2)
    state, states = torch.zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1]), []
    for t in range(v.shape[1]):
        state = g[:, t].exp()[..., None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        states.append(state)
    return torch.stack(states, 1)


@pytest.mark.parametrize("window", [1, 4, 16, 50])
def test_window_is_the_state_difference(window):
    q, k, v, g = recurrence_inputs()
    states = naive_states(q, k, v, g)
    cumulative = g.cumsum(1)  # prod_{t-r<u<=t} a_u = exp(G_t - G_{t-r})
    expected_states = states.clone()
    for t in range(window, states.shape[1]):
        decay = (cumulative[:, t] - cumulative[:, t - window]).exp()[..., None, None]
        expected_states[:, t] = states[:, t] - decay * states[:, t - window]
    expected = torch.einsum("bthn,bthnp->bthp", q.repeat_interleave(2, 2), expected_states)
    out, kept, state = windowed_scan(q, k, v, g, window, None, None, want_state=True)
    assert_close(out, expected, 1e-5)
    assert_close(state, expected_states[:, -1], 1e-5)
    assert kept[0].shape[1] == window - 1


def test_window_continues_from_its_kept_tokens():
    q, k, v, g = recurrence_inputs(length=40)
    whole, _, _ = windowed_scan(q, k, v, g, 9, None, None, want_state=False)
    first, kept, _ = windowed_scan(q[:, :23], k[:, :23], v[:, :23], g[:, :23], 9, None, None, want_state=False)
    rest, _, _ = windowed_scan(q[:, 23:], k[:, 23:], v[:, 23:], g[:, 23:], 9, kept, None, want_state=False)
    assert_close(torch.cat([first, rest], 1), whole, 1e-5)


@pytest.mark.parametrize(("every", "seen"), [(1, 0), (5, 0), (5, 3), (64, 0)])
def test_cap_applies_at_every_nth_token_of_the_row(every, seen):
    q, k, v, g = recurrence_inputs()
    caps = torch.tensor([0.5, 1.0, 2.0, 3.0])
    repeat_k = k.repeat_interleave(2, 2)
    state, expected = torch.zeros(2, 4, 5, 3), []
    for t in range(q.shape[1]):  # the recurrence written out, one token at a time
        state = g[:, t].exp()[..., None, None] * state + repeat_k[:, t, :, :, None] * v[:, t, :, None, :]
        expected.append(torch.einsum("bhn,bhnp->bhp", q.repeat_interleave(2, 2)[:, t], state))
        if (seen + t + 1) % every == 0:  # the state carried past the token is capped
            norms = state.flatten(2).norm(dim=-1)
            state = state * (caps / norms).clamp(max=1)[..., None, None]
    info = build_sequence_info(2, q.shape[1], 0, q.device)
    out, final, counted = capped_scan(q, k, v, g, caps, every, info, torch.full((2,), seen), None)
    assert_close(out, torch.stack(expected, 1), 1e-5)
    assert_close(final, state, 1e-5)
    assert counted.tolist() == [seen + q.shape[1]] * 2


def test_dt_scale_is_a_scaled_decay_and_a_scaled_input():
    """exp(A s dt) = exp((s A) dt) and (s dt) B x = dt (s B) x: dt_scale s equals A_log + log s with b_scale s."""
    ids = torch.randint(0, VOCAB, (2, 30))
    scaled = tiny_model("M", dt_scale=1.7)
    equivalent = tiny_model("M", b_scale=1.7)
    with torch.no_grad():
        equivalent.model.layers[0].mixer.A_log.add_(math.log(1.7))
        assert_close(scaled(ids).logits, equivalent(ids).logits, 1e-5)


def test_b_scale_scales_the_state():
    ids = torch.randint(0, VOCAB, (1, 20))
    states = []
    for scale in (1.0, 0.3):
        model = tiny_model("M", b_scale=scale)
        cache = HybridCache.for_model(model, 1)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        states.append(cache[0].ssm)
    assert_close(states[1], 0.3 * states[0], 1e-5)


MITIGATIONS = {
    "window": {"state_window": 6},
    "cap": {"state_norm_cap": 0.05, "state_norm_every": 4},
    "per_layer_cap": {"state_norm_cap": [[0.05] * 4, None, 0.1], "state_norm_every": 3},
    "per_layer_scales": {"dt_scale": [2.0, None, 0.5], "b_scale": [None, None, 0.7]},
    "window_and_scale": {"state_window": [3, None, 10], "dt_scale": 1.5},
}


@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_prefill_then_decode_equals_full_forward(name):
    model = tiny_model(**MITIGATIONS[name])
    ids = torch.randint(0, VOCAB, (2, 29))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = HybridCache.for_model(model, batch_size=2)
        pieces = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in [(0, 9), (9, 20)]]
        pieces += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 29)]
    assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("name", sorted(MITIGATIONS))
def test_packed_documents_do_not_leak(name):
    model = tiny_model(**MITIGATIONS[name])
    lengths = [5, 14, 9]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False).logits
        alone = [model(doc, use_cache=False).logits for doc in ids.split(lengths, dim=1)]
        # a cache continues the row's last document
        cache = HybridCache.for_model(model, 1)
        model(ids[:, :24], position_ids=positions[:, :24], cache=cache, use_cache=True)
        steps = [
            model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache, use_cache=True).logits
            for t in range(24, 28)
        ]
    assert_close(packed, torch.cat(alone, dim=1))
    assert_close(torch.cat(steps, 1), alone[-1][:, -4:])


@pytest.mark.parametrize("name", ["window", "cap"])
def test_left_padded_generation_matches_each_row_alone(name):
    model = tiny_model(**MITIGATIONS[name])
    short, long = torch.randint(1, VOCAB, (1, 6)), torch.randint(1, VOCAB, (1, 11))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()
    mask[1] = 1
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = [model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0) for x in (short, long)]
    assert torch.equal(together[0, 5:], alone[0][0])
    assert torch.equal(together[1], alone[1][0])


def slow_forgetting_model(**mamba2) -> HybridForCausalLM:
    """Decays close to 1 (A ~ 1e-3): the states keep growing on a long input, the setting of state collapse."""
    model = tiny_model("MM", seed=1, **mamba2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mixer.A_log.fill_(math.log(1e-3))
    return model


def state_norms_along(model, ids, every):
    """Max head state norm of each Mamba-2 layer after every `every` tokens: [steps, layers]."""
    cache, rows = HybridCache.for_model(model, ids.shape[0]), []
    with torch.no_grad():
        for start in range(0, ids.shape[1], every):
            model(ids[:, start : start + every], cache=cache, use_cache=True)
            rows.append(torch.stack([cache[i].ssm.flatten(2).norm(dim=-1).max() for i in range(len(cache))]))
    return torch.stack(rows)


@pytest.mark.parametrize("method", ["state_norm", "state_window"])
def test_mitigation_keeps_state_norms_bounded_where_unmitigated_grow(method):
    length = 32  # the "training" length: calibration input
    stress = torch.full((1, 16 * length), 7)  # one token repeated, like a run of newlines
    in_length = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))

    plain = state_norms_along(slow_forgetting_model(), stress, length)
    assert (plain[-1] > 4 * plain[0]).all(), "the unmitigated states should keep growing"

    model = slow_forgetting_model()
    params = {"every": 8} if method == "state_norm" else {}
    apply_recurrent(model, method, params, original_length=length, in_length_ids=lambda: in_length)
    mitigated = state_norms_along(model, stress, length)
    if method == "state_norm":  # measured every 32 tokens, where the cap (every 8 tokens) applies
        caps = torch.tensor([max(model.config.mamba2["state_norm_cap"][i]) for i in range(2)])
        assert (mitigated <= caps * (1 + 1e-5)).all()
    else:
        assert (mitigated[-1] <= 1.05 * mitigated[1]).all()  # stationary once the window is full
    assert (mitigated[-1] < plain[-1] / 3).all()


def test_state_norm_caps_are_the_in_length_peaks():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 40))
    peaks = max_state_norms(model, ids, stride=8)
    along = []
    cache = HybridCache.for_model(model, 2)
    with torch.no_grad():
        for start in range(0, 40, 8):
            model(ids[:, start : start + 8], cache=cache, use_cache=True)
            along.append(cache[2].ssm.flatten(2).norm(dim=-1).amax(0))
    assert torch.equal(peaks[2], torch.stack(along).amax(0))
    applied = apply_recurrent(model, "state_norm", {"margin": 2.0, "every": 8}, 40, in_length_ids=lambda: ids)
    caps = applied["state_norm_cap"]
    assert model.config.mamba2["state_norm_every"] == 8
    assert caps[1] is None and len(caps[0]) == 4
    assert caps[2] == pytest.approx([2 * float(x) for x in peaks[2]], rel=1e-5)


def test_calibrate_dt_recovers_the_scale_that_generated_the_text():
    """Text sampled with layer 0's dt x 3: the search finds 3 there and leaves layer 1 (noise-level gains only)."""
    truth = tiny_model("MM", seed=5, dt_scale=[3.0, 1.0])
    torch.manual_seed(0)
    with torch.no_grad():
        text = truth.generate(torch.randint(0, VOCAB, (4, 1)), max_new_tokens=120, do_sample=True, pad_token_id=0)
    model = tiny_model("MM", seed=5)
    scales, losses = calibrate_dt_scales(model, text, grid=[0.5, 1.0, 2.0, 3.0], sweeps=2)
    assert scales == [3.0, 1.0]
    assert losses["after"] < losses["before"]
    assert model.config.mamba2["dt_scale"] == [3.0, 1.0]


def test_extended_model_reloads_with_its_per_layer_settings(tmp_path):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 40))
    apply_recurrent(model, "dt_scale", {"scale": [1.5, None, 0.8]}, 32)
    apply_recurrent(model, "state_norm", {}, 32, in_length_ids=lambda: ids[:, :32])
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mamba2 == model.config.mamba2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"dt_scale": -1.0}, "mamba2.dt_scale"),
        ({"dt_scale": [1.0, 1.0]}, "mamba2.dt_scale"),
        ({"dt_scale": [1.0, 2.0, 1.0]}, r"mamba2.dt_scale\[1\]"),
        ({"b_scale": "big"}, "mamba2.b_scale"),
        ({"state_window": 0}, "mamba2.state_window"),
        ({"state_window": 2.5}, "mamba2.state_window"),
        ({"state_norm_cap": [1.0, 2.0]}, "mamba2.state_norm_cap"),
        ({"state_norm_cap": [[1.0] * 3, None, None]}, r"mamba2.state_norm_cap\[0\]"),
        ({"state_norm_cap": 1.0, "state_window": 4}, "mamba2.state_window"),
        ({"state_norm_every": 0}, "mamba2.state_norm_every"),
    ],
)
def test_bad_setting_names_the_key(settings, field):
    with pytest.raises(ValueError, match=field):
        tiny_model(**settings)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("forget_more", {}, "recurrent.method: unknown method 'forget_more'"),
        ("dt_scale", {}, "recurrent.scale: dt_scale needs a scale"),
        ("dt_scale", {"scale": 0}, "recurrent.scale: must be a positive number"),
        ("b_scale", {"scale": [1.0]}, "recurrent.scale: a per-layer list needs one entry per layer"),
        ("state_window", {"window": -3}, "recurrent.window: must be a positive integer"),
        ("state_norm", {"margin": 0}, "recurrent.margin: must be a positive number"),
        ("state_norm", {"cap": 1}, "recurrent.cap: not a parameter of state_norm"),
        ("state_norm", {"every": 0}, "recurrent.every: must be a positive integer"),
        ("calibrate_dt", {"grid": []}, "recurrent.grid: must be a non-empty list"),
        ("calibrate_dt", {"sweeps": 0}, "recurrent.sweeps: must be a positive integer"),
    ],
)
def test_bad_method_or_parameter_is_one_clear_line(method, params, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")) as error:
        apply_recurrent(tiny_model(), method, params, 32, in_length_ids=lambda: torch.zeros(1, 8, dtype=torch.long))
    assert "\n" not in str(error.value)


def test_recurrent_method_on_a_model_without_mamba_layers():
    with pytest.raises(UserError, match="no Mamba-2 layers"):
        apply_recurrent(tiny_model("A"), "state_window", {}, 32)


def test_a_cap_never_reached_leaves_the_model_as_it_was():
    ids = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        plain = tiny_model()(ids).logits
        loose = tiny_model(state_norm_cap=1e9, state_norm_every=4)(ids).logits
    assert_close(loose, plain, 1e-5)
