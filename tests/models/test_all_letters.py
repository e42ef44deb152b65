"""The contract every mixer of issue 6 keeps inside the whole HybridForCausalLM (fp32): chunked prefill +
token-by-token decoding equals one full forward, packed documents do not leak, left padding leaves the
state alone, save/load keeps the logits, state_size() matches the cache and stays flat, and a model with
every letter trains and generates."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from lctk import HybridConfig, HybridForCausalLM
from lctk.models import HybridCache
from lctk.recipe import load_recipe

VOCAB = 61

# small chunks and windows so that short sequences cross several chunk boundaries and leave the window
SECTIONS = dict(
    attention={"window": 8},
    mamba2={"state_size": 16, "head_dim": 16, "chunk_size": 16},
    based={"feature_dim": 4, "chunk_size": 8},
    titans={"chunk_size": 4, "window": 6, "persistent_tokens": 2},
    lact={"chunk_size": 8, "window": 6},
)
CASES = {
    "B": dict(pattern="B"),
    "C": dict(pattern="C"),
    "T-MAG": dict(pattern="T"),
    "T-MAC": dict(pattern="T", titans={"variant": "MAC", "chunk_size": 4, "persistent_tokens": 2}),
    "T-MAL": dict(
        pattern="T",
        titans={"variant": "MAL", "chunk_size": 4, "window": 6, "memory_depth": 1, "persistent_tokens": 0},
    ),
    "L": dict(pattern="L"),
    "L-muon": dict(pattern="L", lact={"chunk_size": 8, "window": 6, "muon": True, "momentum": False}),
    "all": dict(pattern="AMBCSTL"),
}


def tiny_config(pattern: str, **overrides) -> HybridConfig:
    settings = dict(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, **SECTIONS)
    settings.update(overrides)
    return HybridConfig(**settings)


def tiny_model(case: str, seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    model = HybridForCausalLM(tiny_config(**CASES[case])).eval()
    # larger projections than the default init, so that an error is not hidden by near-constant logits
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.25)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, f"max error {(actual - expected).abs().max():.3e}"


def decode(model, ids, pieces, cache=None, **kwargs):
    """Logits of `ids` fed as prefill pieces (lengths) and then one token at a time, through one cache."""
    cache = cache or HybridCache.for_model(model, batch_size=ids.shape[0])
    cuts = [0]
    for n in pieces:
        cuts.append(cuts[-1] + n)
    cuts += range(cuts[-1] + 1, ids.shape[1] + 1)
    return torch.cat(
        [model(ids[:, a:b], cache=cache, **kwargs).logits for a, b in zip(cuts, cuts[1:])], dim=1
    )


@pytest.mark.parametrize("case", CASES)
def test_chunked_prefill_then_decode_equals_full_forward(case):
    model = tiny_model(case)
    ids = torch.randint(0, VOCAB, (2, 31))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        assert_close(decode(model, ids, [5, 7, 9]), full)  # prefills start mid-chunk and cross boundaries
        assert_close(decode(model, ids, [1]), full)  # the recurrent step path alone


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("boundaries", ["position_ids", "cu_seqlens"])
def test_packed_documents_do_not_leak(case, boundaries):
    model = tiny_model(case)
    lengths = [7, 13, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    with torch.no_grad():
        if boundaries == "position_ids":
            positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
            packed = model(ids, position_ids=positions, use_cache=False).logits
        else:
            packed = model(
                ids, cu_seqlens=torch.tensor([0, 7, 20, 26], dtype=torch.int32), use_cache=False
            ).logits
        alone = torch.cat([model(doc, use_cache=False).logits for doc in ids.split(lengths, dim=1)], dim=1)
    assert_close(packed, alone)


@pytest.mark.parametrize("case", CASES)
def test_packed_rows_with_a_cache_continue_each_rows_last_document(case):
    model = tiny_model(case)
    ids = torch.randint(0, VOCAB, (2, 22))
    positions = torch.stack([torch.cat([torch.arange(9), torch.arange(13)]), torch.arange(22)])
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        prefill = model(ids[:, :18], position_ids=positions[:, :18], cache=cache).logits
        steps = [
            model(ids[:, t : t + 1], position_ids=positions[:, t : t + 1], cache=cache).logits
            for t in range(18, 22)
        ]
        got = torch.cat([prefill, *steps], dim=1)
        first = torch.cat([model(ids[:1, :9]).logits, model(ids[:1, 9:]).logits], dim=1)
        second = model(ids[1:]).logits
    assert_close(got, torch.cat([first, second]))


@pytest.mark.parametrize("case", CASES)
def test_left_padding_leaves_the_state_untouched(case):
    model = tiny_model(case)
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

        generated = model.generate(
            batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        alone = model.generate(short, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[0, 7:], alone[0])


@pytest.mark.parametrize("case", ["B", "T-MAG", "T-MAC", "L"])
def test_a_masked_decode_token_leaves_the_memory_untouched(case):
    model = tiny_model(case)
    ids = torch.randint(1, VOCAB, (2, 10))
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=2)
        model(ids[:, :9], cache=cache)
        before = {name: t.clone() for name, t in cache.tensors().items()}
        model(ids[:, 9:], attention_mask=torch.tensor([[1] * 9 + [0], [1] * 10]), cache=cache)
    memory = [name for name in before if name.split(".")[-1] not in ("conv", "keys", "values")]
    assert all(torch.equal(cache.tensors()[name][0], before[name][0]) for name in memory)
    assert not all(torch.equal(cache.tensors()[name][1], before[name][1]) for name in memory)


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_keep_logits(case, tmp_path):
    model = tiny_model(case)
    ids = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM) and loaded.config.pattern == model.config.pattern
    for section in ("based", "baseconv", "titans", "lact"):
        assert getattr(loaded.config, section) == getattr(model.config, section)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)


@pytest.mark.parametrize("case", CASES)
def test_state_size_counts_the_cache_and_stays_flat(case):
    model = tiny_model(case)
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        cache = HybridCache.for_model(model, batch_size=1)
        model(ids, cache=cache)
    ours = [layer for layer, letter in enumerate(model.config.pattern) if letter in "BCTL"]
    sizes = model.state_size(20)
    for layer in ours:
        assert sum(t.numel() for t in cache[layer].tensors().values()) == sizes[layer], model.config.pattern[
            layer
        ]
    small, large = model.state_size(2048), model.state_size(8192)
    assert all(small[layer] == large[layer] for layer in ours)


def test_defaults_build_from_hidden_size_and_heads():
    config = HybridConfig(pattern="BCTL", hidden_size=128, num_attention_heads=4, vocab_size=VOCAB)
    assert (
        config.based["num_heads"] == 4 and config.lact["num_heads"] == 4 and config.titans["variant"] == "MAG"
    )
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        assert model(torch.randint(0, VOCAB, (1, 5))).logits.shape == (1, 5, VOCAB)


@pytest.mark.parametrize(
    "section, settings, key",
    [
        ("based", {"feature_dim": 0}, "based.feature_dim"),
        ("based", {"num_heads": 3}, "based.num_heads"),
        ("baseconv", {"conv_kernel": 1}, "baseconv.conv_kernel"),
        ("titans", {"variant": "MAX"}, "titans.variant"),
        ("titans", {"memory_depth": 0}, "titans.memory_depth"),
        ("titans", {"persistent_tokens": -1}, "titans.persistent_tokens"),
        ("lact", {"num_heads": 5}, "lact.num_heads"),
        ("lact", {"muon": "yes"}, "lact.muon"),
        ("lact", {"chunk": 64}, "lact.chunk"),
    ],
)
def test_bad_settings_name_the_key(section, settings, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HybridConfig(pattern="BCTL", hidden_size=32, num_attention_heads=2, **{section: settings})


def test_every_letter_trains_with_falling_loss_and_generates():
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("AMBCSTL", titans={"variant": "MAC", "chunk_size": 4})).train()
    # a repeated random block: the second half is predictable from the first by recall
    block = torch.randint(0, VOCAB, (4, 16))
    ids = torch.cat([block, block], dim=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            silent = [
                name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
            ]
            assert not silent, f"parameters without gradient: {silent}"
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    model.eval()
    out = model.generate(ids[:2, :20], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 26)
    with torch.no_grad():
        assert_close(decode(model, ids[:2], [20]), model(ids[:2], use_cache=False).logits)


RECIPES = Path(__file__).parents[2] / "recipes"  # tests/test_recipe.py validates every recipe


def test_based_360m_follows_the_papers_layout():
    config = load_recipe(RECIPES / "based-360m.yaml").hybrid_config(vocab_size=50257)
    at = {letter: [i for i, x in enumerate(config.pattern) if x == letter] for letter in "BSC"}
    assert (config.num_hidden_layers, config.hidden_size) == (27, 1024)
    assert at["B"] == [1, 6, 11, 16, 21] and at["S"] == [2, 7, 12, 17, 22] and len(at["C"]) == 17
