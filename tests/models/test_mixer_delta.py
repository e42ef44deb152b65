"""Gated DeltaNet (`G`) and Kimi Delta Attention (`K`): the layer against a recomputation from its weights with the
papers' matrix recurrence, fla's defaults, the contract every mixer keeps inside HybridForCausalLM (chunked prefill +
decoding = one full forward, documents that do not leak, padding, save/load, state size), in-place cache updates,
and settings errors that name their key."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_all_letters import VOCAB, assert_close, decode
from torch import nn
from transformers import AutoModelForCausalLM

from lctk import HybridConfig, HybridForCausalLM
from lctk.models import HybridCache
from lctk.models.mixers import MIXERS
from lctk.models.mixers.gated_deltanet import GatedDeltaNet
from lctk.models.mixers.kda import KimiDeltaAttention
from lctk.models.sequence import build_sequence_info

SECTIONS = dict(gated_deltanet={"num_heads": 2, "head_dim": 8, "chunk_size": 8},
                kda={"num_heads": 2, "head_dim": 8, "chunk_size": 8})
CASES = {"G": "G", "K": "K", "mixed": "AGKM"}


def tiny_model(pattern: str, seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                          mamba2={"state_size": 16, "head_dim": 16, "chunk_size": 16}, **SECTIONS)
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():  # larger projections than the default init, so that an error is not hidden by flat logits
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.25)
    return model


def matrix_form(mixer, x: torch.Tensor) -> torch.Tensor:
    """The layer recomputed from its weights for one sequence [T, hidden], with the state as [d_v, d_k] and
    S_t = S_{t-1} Diag(a_t) (I - b_t k_t k_t^T) + b_t v_t k_t^T (fla's layer order: project, conv, silu, L2 norm)."""
    heads, d_k, d_v = mixer.num_heads, mixer.key_dim, mixer.value_dim
    qkv = torch.cat([mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)], -1)  # [T, C]
    padded = F.pad(qkv.T, (mixer.conv_kernel - 1, 0))
    qkv = F.silu(F.conv1d(padded.unsqueeze(0), mixer.conv_weight.unsqueeze(1), groups=qkv.shape[1])[0].T)
    q, k, v = qkv.split(mixer.conv_split, -1)
    q, k = (t.unflatten(-1, (heads, d_k)) for t in (q, k))
    q, k = (t / (t.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt() for t in (q, k))  # fla's l2norm
    v = v.unflatten(-1, (heads, d_v))
    b = torch.sigmoid(mixer.b_proj(x))
    if isinstance(mixer, KimiDeltaAttention):
        f = (mixer.f_proj(x) + mixer.dt_bias).unflatten(-1, (heads, d_k))
        a = torch.exp(-mixer.A_log.exp()[:, None] * F.softplus(f))  # [T, H, d_k]
        gate = torch.sigmoid(mixer.g_proj(x))
    else:
        a = torch.exp(-mixer.A_log.exp() * F.softplus(mixer.a_proj(x) + mixer.dt_bias))[..., None].expand(-1, -1, d_k)
        gate = F.silu(mixer.g_proj(x))
    outputs = []
    for h in range(heads):
        S, out = torch.zeros(d_v, d_k, dtype=x.dtype), []
        for t in range(x.shape[0]):
            kt = k[t, h]
            S = S @ torch.diag(a[t, h]) @ (torch.eye(d_k, dtype=x.dtype) - b[t, h] * torch.outer(kt, kt))
            S = S + b[t, h] * torch.outer(v[t, h], kt)
            out.append(S @ q[t, h] / math.sqrt(d_k))
        outputs.append(torch.stack(out))
    o = torch.stack(outputs, 1)  # [T, H, d_v]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.o_norm.eps) * mixer.o_norm.weight
    return mixer.o_proj((o * gate.unflatten(-1, (heads, d_v))).flatten(-2))


@pytest.mark.parametrize("letter", ["G", "K"])
def test_layer_matches_the_papers_recurrence_from_its_weights(letter):
    torch.manual_seed(0)
    config = HybridConfig(pattern=letter, hidden_size=24, num_attention_heads=2, **SECTIONS)
    mixer = MIXERS[letter](config, letter).double()
    with torch.no_grad():
        for module in mixer.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.3)
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    with torch.no_grad():
        out = mixer(x, build_sequence_info(2, 19, 0, x.device))
        for row in range(2):
            assert_close(out[row], matrix_form(mixer, x[row]), tol=1e-5)  # the norms run in fp32


def test_defaults_follow_fla():
    """At fla's width (hidden 2048): G has 6 heads of 256, values 2x, conv 4 (about 6 hidden^2 parameters, the budget
    fla's docstring gives); K has 16 heads of 128 and values 1x."""
    config = HybridConfig(pattern="GK", hidden_size=2048, num_attention_heads=16)
    assert config.gated_deltanet == {"num_heads": 6, "head_dim": 256, "expand_v": 2.0, "conv_kernel": 4,
                                     "chunk_size": 64}
    assert config.kda == {"num_heads": 16, "head_dim": 128, "expand_v": 1.0, "conv_kernel": 4, "chunk_size": 64}
    with torch.device("meta"):
        gdn, kda = GatedDeltaNet(config, "G"), KimiDeltaAttention(config, "K")
    projections = sum(p.numel() for name, p in gdn.named_parameters() if name.endswith("proj.weight"))
    assert projections == pytest.approx(6 * 2048**2, rel=0.01)
    assert kda.f_proj[0].weight.shape == (128, 2048) and kda.g_proj[1].bias.shape == (2048,)
    assert kda.dt_bias.shape == (2048,) and gdn.dt_bias.shape == (6,)


def test_fresh_parameters_follow_fla():
    config = HybridConfig(pattern="GK", hidden_size=256, num_attention_heads=4)
    torch.manual_seed(0)
    model = HybridForCausalLM(config)
    gdn, kda = model.model.layers[0].mixer, model.model.layers[1].mixer
    dt = F.softplus(gdn.dt_bias)
    assert ((dt > 0.99e-3) & (dt < 0.101)).all()  # log-uniform in [0.001, 0.1]
    assert (gdn.A_log.exp() <= 16).all() and (kda.A_log.exp() >= 1).all() and (kda.A_log.exp() <= 16).all()
    assert not kda.dt_bias.any()
    assert torch.equal(gdn.o_norm.weight, torch.ones(gdn.value_dim))


@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_then_decode_equals_full_forward(case):
    model = tiny_model(CASES[case])
    ids = torch.randint(0, VOCAB, (2, 31))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert_close(decode(model, ids, [5, 7, 9]), full)  # prefills start mid-chunk and cross chunk boundaries
        assert_close(decode(model, ids, [1]), full)  # the recurrent step path alone


@pytest.mark.parametrize("letter", ["G", "K"])
def test_decoding_updates_the_cache_in_place(letter):
    model = tiny_model(letter)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        buffers = {name: t.data_ptr() for name, t in cache.tensors().items()}
        model(ids[:, :9], cache=cache)
        before = {name: t.clone() for name, t in cache.tensors().items()}
        for t in range(9, 12):
            model(ids[:, t : t + 1], cache=cache)
    assert {name: t.data_ptr() for name, t in cache.tensors().items()} == buffers
    assert all(not torch.equal(cache.tensors()[name], before[name]) for name in before)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seqlens"])
def test_packed_documents_do_not_leak(case, boundaries):
    model = tiny_model(CASES[case])
    lengths = [7, 13, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    with torch.no_grad():
        if boundaries == "position_ids":
            positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            packed = model(ids, position_ids=positions, use_cache=False).logits
        else:
            packed = model(ids, cu_seqlens=torch.tensor([0, 7, 20, 26], dtype=torch.int32), use_cache=False).logits
        alone = torch.cat([model(doc, use_cache=False).logits for doc in ids.split(lengths, dim=1)], dim=1)
    assert_close(packed, alone)


@pytest.mark.parametrize("letter", ["G", "K"])
def test_packed_rows_with_a_cache_continue_each_rows_last_document(letter):
    model = tiny_model(letter)
    ids = torch.randint(0, VOCAB, (2, 22))
    positions = torch.stack([torch.cat([torch.arange(9), torch.arange(13)]), torch.arange(22)])
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        prefill = model(ids[:, :18], position_ids=positions[:, :18], cache=cache).logits
        steps = [model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache).logits
                 for t in range(18, 22)]
        got = torch.cat([prefill, *steps], dim=1)
        first = torch.cat([model(ids[:1, :9]).logits, model(ids[:1, 9:]).logits], dim=1)
        second = model(ids[1:]).logits
    assert_close(got, torch.cat([first, second]))


@pytest.mark.parametrize("letter", ["G", "K"])
def test_left_padding_and_a_masked_decode_token_leave_the_state_alone(letter):
    model = tiny_model(letter)
    short, long = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 16))
    batch = torch.cat([torch.cat([torch.zeros(1, 7, dtype=torch.long), short], dim=1), long])
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :7] = 0
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        logits = [model(batch[:, :11], attention_mask=mask[:, :11], cache=cache).logits]
        for t in range(11, 16):
            logits.append(model(batch[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        together = torch.cat(logits, dim=1)
        assert_close(together[:1, 7:], model(short, use_cache=False).logits)
        assert_close(together[1:], model(long, use_cache=False).logits)

        before = cache[0].recurrent.clone()
        model(batch[:, :1], attention_mask=torch.cat([mask, torch.tensor([[0], [1]])], 1), cache=cache)
        assert torch.equal(cache[0].recurrent[0], before[0]) and not torch.equal(cache[0].recurrent[1], before[1])

        generated = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        alone = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 7:], alone[0])


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_keep_logits_and_state_size_counts_the_cache(case, tmp_path):
    model = tiny_model(CASES[case])
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        before = model(ids, cache=cache).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.gated_deltanet == model.config.gated_deltanet and loaded.config.kda == model.config.kda
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    sizes, longer = model.state_size(14), model.state_size(8192)
    for layer, letter in enumerate(model.config.pattern):
        if letter in "GK":
            assert sum(t[0].numel() for t in cache[layer].tensors().values()) == sizes[layer] == longer[layer]


def test_a_model_with_both_letters_trains_with_falling_loss():
    torch.manual_seed(0)
    model = tiny_model("CGCK").train()
    block = torch.randint(0, VOCAB, (4, 16))
    ids = torch.cat([block, block], dim=1)  # the second half is recall of the first
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, f"parameters without gradient: {silent}"
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses


@pytest.mark.parametrize(
    "section, settings, key",
    [
        ("gated_deltanet", {"expand_v": 0.3}, "gated_deltanet.expand_v"),
        ("gated_deltanet", {"conv_kernel": 1}, "gated_deltanet.conv_kernel"),
        ("gated_deltanet", {"num_heads": 0}, "gated_deltanet.num_heads"),
        ("kda", {"head_dim": "wide"}, "kda.head_dim"),
        ("kda", {"decay": "channel"}, "kda.decay"),
    ],
)
def test_bad_settings_name_the_key(section, settings, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HybridConfig(pattern="GK", hidden_size=32, num_attention_heads=2, **{section: settings})
