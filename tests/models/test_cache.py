"""The cache's buffers: attention keys and values preallocated (sized by generate) or grown by doubling, a sliding
window as a ring, recurrent states updated in place; beam reorder and row selection on them. Every path is checked
against a full forward (the old outputs) or against the eager backend's whole-mask attention."""

import pytest
import torch

from lctk import HybridConfig, HybridForCausalLM
from lctk.models import HybridCache
from lctk.models.mixers import attention

VOCAB = 61


def tiny(pattern: str, backend: str = "sdpa", seed: int = 0) -> HybridForCausalLM:
    torch.manual_seed(seed)
    config = HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=2, attention={"window": 6, "backend": backend},
                          mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 8}, based={"feature_dim": 4})
    model = HybridForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    return model


def assert_close(actual, expected, tol=1e-4):
    scale = expected.abs().max().clamp(min=1.0)
    assert (actual - expected).abs().max() <= tol * scale, f"max error {(actual - expected).abs().max():.3e}"


def feed(model, ids, pieces, cache, **kwargs):
    """Logits of ids fed in pieces of these lengths, then one token at a time."""
    cuts = [0]
    for n in pieces:
        cuts.append(cuts[-1] + n)
    cuts += range(cuts[-1] + 1, ids.shape[1] + 1)
    return torch.cat([model(ids[:, a:b], cache=cache, **kwargs).logits for a, b in zip(cuts, cuts[1:])], dim=1)


@torch.no_grad()
def test_unsized_buffers_double_and_keep_the_logits(monkeypatch):
    monkeypatch.setattr(attention, "GROWTH_STEP", 4)
    model = tiny("AMA")
    ids = torch.randint(0, VOCAB, (2, 40))
    cache = HybridCache.for_model(model, batch_size=2)
    capacities = []
    logits = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 40):
        logits.append(model(ids[:, t : t + 1], cache=cache).logits)
        capacities.append(cache[0].max_cache_len)
    assert_close(torch.cat(logits, dim=1), model(ids, use_cache=False).logits)
    assert sorted(set(capacities)) == [8, 16, 32, 64]  # 5 rounded up to 8, then doubled: 3 reallocations for 35 tokens


@torch.no_grad()
def test_a_sized_cache_never_reallocates_and_steps_update_states_in_place():
    model = tiny("AMBCS")
    ids = torch.randint(0, VOCAB, (2, 30))
    cache = HybridCache.for_model(model, batch_size=2, max_length=30)
    model(ids[:, :11], cache=cache)
    addresses = {name: t.data_ptr() for name, t in cache.tensors().items()}
    buffers = [cache[i].keys.data_ptr() for i in (0, 4)]
    steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(11, 30)]
    assert {name: t.data_ptr() for name, t in cache.tensors().items()} == addresses
    assert [cache[i].keys.data_ptr() for i in (0, 4)] == buffers
    assert cache[0].max_cache_len == 30 and cache[4].max_cache_len == 6  # the window's ring
    assert_close(torch.cat(steps, dim=1), model(ids, use_cache=False).logits[:, 11:])


@pytest.mark.parametrize("pieces", [[6], [7, 6], [3, 13, 1], [1, 2]])  # exactly the window, past it, wrapping
@torch.no_grad()
def test_the_window_ring_matches_the_full_forward_and_the_old_mask(pieces):
    ids = torch.randint(0, VOCAB, (2, 29))
    full = tiny("S")(ids, use_cache=False).logits
    for backend in ("sdpa", "eager"):
        model = tiny("S", backend)
        assert_close(feed(model, ids, pieces, HybridCache.for_model(model, batch_size=2)), full)


@torch.no_grad()
def test_padded_rows_decode_as_the_eager_whole_mask():
    ids = torch.randint(1, VOCAB, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[0, :4], mask[1, :9] = 0, 0
    got, want = [], []
    for backend, out in (("sdpa", got), ("eager", want)):
        model = tiny("ASM", backend)
        cache = HybridCache.for_model(model, batch_size=3)
        out.append(model(ids[:, :12], attention_mask=mask[:, :12], cache=cache).logits)
        out += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(12, 20)]
    keep = mask.bool()
    assert_close(torch.cat(got, dim=1)[keep], torch.cat(want, dim=1)[keep])


@torch.no_grad()
def test_selected_and_repeated_rows_continue_like_those_rows_alone():
    model = tiny("AMSB")
    ids = torch.randint(0, VOCAB, (3, 16))
    cache = HybridCache.for_model(model, batch_size=3)
    model(ids[:, :10], cache=cache)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0
    rows = ids[[2, 2, 0, 0]]
    got = torch.cat([model(rows[:, t : t + 1], cache=cache).logits for t in range(10, 16)], dim=1)
    assert_close(got, model(rows, use_cache=False).logits[:, 10:])


@pytest.mark.parametrize("pattern", ["A", "MSAM"])
def test_beam_search_reorders_the_buffers(pattern):
    model = tiny(pattern)
    prompt = torch.randint(1, VOCAB, (2, 7))
    options = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, **options)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **options))


@pytest.mark.slow  # compiles (tens of seconds on a loaded CPU)
@pytest.mark.parametrize("cuda_graphs", [False, True])  # dynamic views / the whole buffer under a mask
def test_compiled_decoding_gives_the_eager_logits(cuda_graphs):
    model = tiny("AMS")
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        model.compile_decoding(cuda_graphs=cuda_graphs)
        assert all(layer.mixer.static_decode == cuda_graphs for layer in model.model.layers if layer.mixer.letter in "AS")
        got = feed(model, ids, [6], HybridCache.for_model(model, batch_size=2, max_length=16))
    assert_close(got, want)
    model.compile_decoding(False)
    assert model.model.compiled_layers is None and not model.model.layers[0].mixer.static_decode


def test_preallocated_caches_for_any_causal_lm():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, StaticCache

    from lctk.models import preallocated_cache, preallocated_generation

    ours = preallocated_cache(tiny("AM"), batch_size=2, max_length=40)
    assert isinstance(ours, HybridCache) and ours[0].max_cache_len == 40
    assert preallocated_generation(tiny("AM")) == {}  # generate sizes the HybridCache itself
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    cache = preallocated_cache(llama, batch_size=1, max_length=24)
    assert isinstance(cache, StaticCache) and cache.get_max_length() == 24
    prompt = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        first = llama(prompt, cache=cache, use_cache=True).logits
        step = llama(prompt[:, :1], cache=cache, use_cache=True).logits
        again = llama(torch.cat([prompt, prompt[:, :1]], dim=1), use_cache=False).logits
    assert_close(torch.cat([first, step], dim=1), again)
    options = preallocated_generation(llama)
    assert options == {"cache_implementation": "static"}
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(llama.generate(prompt, **options, **greedy), llama.generate(prompt, **greedy))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert (preallocated_cache(gpt2, 1, 8) is None) == (not gpt2._can_compile_fullgraph)
