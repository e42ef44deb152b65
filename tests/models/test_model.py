"""The hybrid model core: config validation, cache equivalence, packed documents, padding, generation, save/load."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from lctk import HybridConfig, HybridForCausalLM
from lctk.models import HybridCache
from lctk.models.mixers.mamba2 import Mamba2
from lctk.models.sequence import build_sequence_info

VOCAB = 97


def tiny_config(pattern: str, **overrides) -> HybridConfig:
    settings = dict(
        pattern=pattern,
        vocab_size=VOCAB,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention={"window": 8},
        mamba2={"state_size": 16, "head_dim": 16, "n_groups": 2, "chunk_size": 16},
    )
    settings.update(overrides)
    return HybridConfig(**settings)


def tiny_model(pattern: str, seed: int = 0, **overrides) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config(pattern, **overrides)).eval()
    # larger weights than the default init so that errors are not hidden by tiny logits
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, f"max error {(actual - expected).abs().max():.3e}"


PATTERNS = ["A", "S", "M", "MSAM"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chunked_prefill_then_decode_equals_full_forward(pattern):
    model = tiny_model(pattern)
    ids = torch.randint(0, VOCAB, (2, 45))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = HybridCache.for_model(model, batch_size=2)
        pieces = [model(ids[:, a:b], cache=cache, use_cache=True).logits for a, b in [(0, 13), (13, 30)]]
        pieces += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 45)]
    assert cache.get_seq_length() == 45
    assert_close(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seqlens"])
def test_packed_documents_do_not_leak(pattern, boundaries):
    model = tiny_model(pattern)
    lengths = [7, 20, 13]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    with torch.no_grad():
        if boundaries == "position_ids":
            positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            packed = model(ids, position_ids=positions, use_cache=False).logits
        else:
            cu_seqlens = torch.tensor([0, 7, 27, 40], dtype=torch.int32)
            packed = model(ids, cu_seqlens=cu_seqlens, use_cache=False).logits
        alone = [model(doc, use_cache=False).logits for doc in ids.split(lengths, dim=1)]
    assert_close(packed, torch.cat(alone, dim=1))


def test_packed_rows_in_a_batch_do_not_leak():
    model = tiny_model("MSAM")
    ids = torch.randint(0, VOCAB, (2, 24))
    positions = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    with torch.no_grad():
        packed = model(ids, position_ids=positions, use_cache=False).logits
        first = torch.cat([model(ids[:1, :10]).logits, model(ids[:1, 10:]).logits], dim=1)
        second = model(ids[1:]).logits
    assert_close(packed, torch.cat([first, second]))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_packed_prefill_then_decode_continues_the_last_document(pattern):
    model = tiny_model(pattern)
    ids = torch.randint(0, VOCAB, (1, 30))
    positions = torch.cat([torch.arange(12), torch.arange(18)]).unsqueeze(0)
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=1)
        model(ids[:, :26], position_ids=positions[:, :26], cache=cache, use_cache=True)
        steps = [
            model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache, use_cache=True).logits
            for t in range(26, 30)
        ]
        second_doc = model(ids[:, 12:]).logits[:, -4:]
    assert_close(torch.cat(steps, dim=1), second_doc)


@pytest.mark.parametrize("pattern", ["MSAM", "M", "A", "S"])
def test_left_padded_batch_generation_matches_each_row_alone(pattern):
    model = tiny_model(pattern)
    short, long = torch.randint(1, VOCAB, (1, 6)), torch.randint(1, VOCAB, (1, 11))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.cat([torch.cat([torch.zeros(1, 5), torch.ones(1, 6)], 1), torch.ones(1, 11)]).long()
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        alone_short = model.generate(short, max_new_tokens=10, do_sample=False, pad_token_id=0)
        alone_long = model.generate(long, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(together[0, 5:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


def test_generate_greedy_matches_argmax_of_full_forward():
    model = tiny_model("MSAM")
    prompt = torch.randint(0, VOCAB, (1, 9))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(out, tokens)


def test_generate_sampling_is_seeded():
    model = tiny_model("MSAM")
    prompt = torch.randint(0, VOCAB, (3, 5))
    torch.manual_seed(1)
    a = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(1)
    b = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert a.shape == (3, 13) and torch.equal(a, b)
    assert int(a.max()) < VOCAB


def test_save_and_load_keep_logits(tmp_path):
    model = tiny_model("MMAMMA")
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "lctk_hybrid"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM)
    assert loaded.config.mamba2 == model.config.mamba2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


def test_tied_embeddings_share_storage():
    model = tiny_model("MA")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    untied = HybridForCausalLM(tiny_config("MA", tie_word_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()


def test_state_size_grows_for_attention_only():
    model = tiny_model("ASM")
    small, large = model.state_size(100), model.state_size(1000)
    head_elems = 2 * 2 * 16  # k and v, 2 kv heads of 16
    assert small[0] == head_elems * 100 and large[0] == head_elems * 1000
    assert small[1] == large[1] == head_elems * 7  # window 8 keeps 7 keys
    assert small[2] == large[2] == 3 * (128 + 2 * 2 * 16) + 8 * 16 * 16


def test_mamba2_mixer_matches_transformers_mamba2():
    torch.manual_seed(0)
    config = tiny_config("M")
    ours = Mamba2(config, "M")
    theirs = Mamba2Mixer(
        Mamba2Config(
            hidden_size=64, state_size=16, head_dim=16, n_groups=2, expand=2, num_heads=8, conv_kernel=4,
            chunk_size=16, use_conv_bias=True, use_bias=False, layer_norm_epsilon=config.rms_norm_eps,
        ),
        layer_idx=0,
    ).eval()
    with torch.no_grad():
        ours.D.uniform_(0, 2)
        ours.norm.weight.uniform_(0.5, 1.5)
        for mine, other in [
            (ours.in_proj.weight, theirs.in_proj.weight), (ours.conv_weight.unsqueeze(1), theirs.conv1d.weight),
            (ours.conv_bias, theirs.conv1d.bias), (ours.dt_bias, theirs.dt_bias), (ours.A_log, theirs.A_log),
            (ours.D, theirs.D), (ours.norm.weight, theirs.norm.weight), (ours.out_proj.weight, theirs.out_proj.weight),
        ]:
            other.copy_(mine)
        x = torch.randn(2, 50, 64)
        expected = theirs(x)
        actual = ours(x, build_sequence_info(2, 50, 0, x.device))
    assert_close(actual, expected, tol=1e-5)


def test_shared_xb_heads_equal_repeated_projections():
    """xb_heads = 2 of 8 heads behaves as the full-size mixer whose x/B projection rows are repeated."""
    torch.manual_seed(0)
    shared = Mamba2(tiny_config("M", mamba2={"state_size": 16, "head_dim": 16, "n_groups": 4, "xb_heads": 2}), "M")
    full = Mamba2(tiny_config("M", mamba2={"state_size": 16, "head_dim": 16, "n_groups": 4}), "M")
    d_inner, n = 128, 16
    z, x, b, c, dt = shared.in_proj.weight.split([d_inner, 2 * 16, 2 * n, 4 * n, 8])
    conv_x, conv_b, conv_c = shared.conv_weight.split([2 * 16, 2 * n, 4 * n])
    bias_x, bias_b, bias_c = shared.conv_bias.split([2 * 16, 2 * n, 4 * n])

    def repeat(t, size, times):
        return t.unflatten(0, (-1, size)).repeat_interleave(times, dim=0).flatten(0, 1)

    with torch.no_grad():
        full.in_proj.weight.copy_(torch.cat([z, repeat(x, 16, 4), repeat(b, n, 2), c, dt]))
        full.conv_weight.copy_(torch.cat([repeat(conv_x, 16, 4), repeat(conv_b, n, 2), conv_c]))
        full.conv_bias.copy_(torch.cat([repeat(bias_x, 16, 4), repeat(bias_b, n, 2), bias_c]))
        for name in ("dt_bias", "A_log", "D"):
            getattr(full, name).copy_(getattr(shared, name))
        full.out_proj.weight.copy_(shared.out_proj.weight)
        x_in = torch.randn(2, 30, 64)
        seq = build_sequence_info(2, 30, 0, x_in.device)
        assert_close(shared(x_in, seq), full(x_in, seq), tol=1e-5)


def test_a_state_probe_sees_dt_decay_b_and_x_until_removed():
    torch.manual_seed(0)
    mixer = Mamba2(tiny_config("M"), "M")
    hidden = torch.randn(2, 10, 64)
    seq = build_sequence_info(2, 10, 0, hidden.device)
    seen, others = [], []
    handle = mixer.register_state_probe(lambda **values: seen.append(values))
    mixer.register_state_probe(lambda **values: others.append(values))
    with torch.no_grad():
        mixer(hidden, seq)
        _, xbc, dt = mixer.in_proj(hidden).split([mixer.d_inner, mixer.conv_dim, mixer.num_heads], dim=-1)
        padded = F.pad(xbc.transpose(1, 2), (mixer.conv_kernel - 1, 0))
        conv = F.conv1d(padded, mixer.conv_weight.unsqueeze(1), mixer.conv_bias, groups=mixer.conv_dim)
        x, b, _ = F.silu(conv.transpose(1, 2)).split(mixer.conv_split, dim=-1)
        dt = F.softplus(dt + mixer.dt_bias)
        (values,) = seen
        torch.testing.assert_close(values["dt"], dt)
        torch.testing.assert_close(values["decay"], torch.exp(-torch.exp(mixer.A_log) * dt))
        torch.testing.assert_close(values["b"], b.unflatten(-1, (mixer.n_groups, mixer.d_state)))
        torch.testing.assert_close(values["x"], x.unflatten(-1, (mixer.num_heads, mixer.head_dim)))
        handle.remove()
        mixer(hidden, seq)
    assert len(seen) == 1 and len(others) == 2  # the removed probe is no longer called, the other one still is


def test_gradients_flow_to_every_parameter():
    model = tiny_model("MSAM").train()
    ids = torch.randint(0, VOCAB, (2, 20))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"pattern": "MXA"}, "pattern"),
        ({"pattern": ""}, "pattern"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 66, "head_dim": None}, "hidden_size"),
        ({"mamba2": {"head_dim": 24}}, "mamba2.head_dim"),
        ({"mamba2": {"n_groups": 3}}, "mamba2.n_groups"),
        ({"mamba2": {"n_groups": 2, "xb_heads": 4}}, "mamba2.xb_heads"),
        ({"mamba2": {"chunk_size": 0}}, "mamba2.chunk_size"),
        ({"mamba2": {"stat_size": 8}}, "mamba2.stat_size"),
        ({"attention": {"backend": "magic"}}, "attention.backend"),
        ({"pattern": "S", "attention": {"window": -1}}, "attention.window"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        tiny_config(overrides.pop("pattern", "MSA"), **overrides)


def test_eager_and_sdpa_backends_agree():
    ids = torch.randint(0, VOCAB, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[0, :4] = 0
    with torch.no_grad():
        sdpa = tiny_model("AS")(ids, attention_mask=mask).logits
        eager = tiny_model("AS", attention={"window": 8, "backend": "eager"})(ids, attention_mask=mask).logits
    assert_close(eager[:, 4:], sdpa[:, 4:])


def test_blocked_sliding_window_equals_the_masked_one_on_packed_rows():
    """A full forward of `S` with sdpa goes through blocks of queries; eager builds the whole mask."""
    ids = torch.randint(0, VOCAB, (1, 40))
    position_ids = torch.cat([torch.arange(23), torch.arange(17)]).unsqueeze(0)
    with torch.no_grad():
        blocked = tiny_model("S")(ids, position_ids=position_ids).logits
        masked = tiny_model("S", attention={"window": 8, "backend": "eager"})(ids, position_ids=position_ids).logits
    assert_close(blocked, masked)


@pytest.mark.parametrize("block_checkpointing", [False, True])
def test_segmented_recompute_gives_the_same_loss_and_gradients(block_checkpointing):
    """recompute_in_segments (norm + MLP of every block, Mamba-2 layers): documents crossing segment edges, one
    starting exactly at an edge, a last segment of one token, two rows; alone and nested inside per-block activation
    checkpointing."""
    whole, segmented = tiny_model("MAM").train(), tiny_model("MAM").train()
    segmented.recompute_in_segments(8)
    if block_checkpointing:
        segmented.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    position_ids = torch.cat([torch.arange(5), torch.arange(11), torch.arange(17)]).expand(2, -1).clone()
    position_ids[1] = torch.arange(33)  # second row: one document over every edge
    ids = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for model in (whole, segmented):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, position_ids=position_ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([embeds.grad] + [p.grad for p in model.parameters()])
    assert_close(losses[1], losses[0], tol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        assert_close(got, want, tol=1e-4)


def test_segmented_recompute_resets_the_state_where_a_document_starts_at_an_edge():
    model = tiny_model("M").train()
    model.recompute_in_segments(8)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    split = torch.cat([torch.arange(8), torch.arange(8)])[None]
    joined = torch.arange(16)[None]
    second_alone = model(ids[:, 8:]).logits
    assert_close(model(ids, position_ids=split).logits[:, 8:], second_alone, tol=1e-5)
    assert (model(ids, position_ids=joined).logits[:, 8:] - second_alone).abs().max() > 1e-3


def test_segmented_recompute_keeps_less_for_backward():
    """What autograd saves for backward: with segments, the Mamba-2 layer and the MLP keep their inputs only."""
    def saved_bytes(model) -> int:
        storages = {}
        def pack(tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(torch.randint(0, VOCAB, (1, 256)), use_cache=False)
        return sum(storages.values())

    model = tiny_model("M").train()
    whole = saved_bytes(model)
    model.recompute_in_segments(32)
    assert saved_bytes(model) < 0.5 * whole
    model.recompute_in_segments(None)
    assert saved_bytes(model) == whole
    with pytest.raises(ValueError, match="positive number of tokens"):
        model.recompute_in_segments(0)
