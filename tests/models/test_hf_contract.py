"""transformers' model contract, one test per behaviour its own ModelTesterMixin / GenerationTesterMixin check (their
test files are not in the installed package): output_attentions, config defaults of output_hidden_states and
return_dict, tuples for return_dict=False, hidden_states[-1] == last_hidden_state, attn_implementation, continuing
generate() from a returned cache with the full input_ids, short attention masks, cache_implementation, torch.export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lctk import HybridConfig, HybridForCausalLM

PATTERNS = ("A", "AM", "MAMS", "BCTL")


def tiny(pattern: str, **settings) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(pattern=pattern, vocab_size=64, hidden_size=32, num_attention_heads=2, **settings)
    return HybridForCausalLM(config).eval()


def ids(batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_output_attentions_gives_a_and_s_weights_on_the_eager_path(pattern):
    model = tiny(pattern)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(ids(), output_attentions=True).attentions
    assert len(attentions) == len(pattern)
    for letter, weights in zip(pattern, attentions):
        if letter in "AS":
            assert weights.shape == (2, 2, 6, 6)
            assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 6)) and not weights.triu(1).any()
        else:
            assert weights is None
    model.config.output_attentions = True  # the config's default
    assert model(ids()).attentions is not None


@pytest.mark.parametrize("pattern", PATTERNS)
def test_hidden_states_and_return_dict_follow_transformers(pattern):
    model = tiny(pattern)
    with torch.no_grad():
        out = model(ids(), output_hidden_states=True)
        assert len(out.hidden_states) == len(pattern) + 1
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # after the final norm
        assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids()))
        as_tuple = model(ids(), return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
        assert isinstance(model.model(ids(), return_dict=False), tuple)
        model.config.output_hidden_states = True
        assert len(model(ids()).hidden_states) == len(pattern) + 1
        model.config.return_dict = False
        assert isinstance(model(ids()), tuple)


def test_attn_implementation_chooses_the_attention_backend(tmp_path):
    model = tiny("MAMS")
    mixers = [layer.mixer for layer in model.model.layers if layer.mixer.letter in "AS"]
    assert model.config._attn_implementation == "sdpa" and {m.backend for m in mixers} == {"sdpa"}
    assert HybridForCausalLM._supports_flash_attn and HybridForCausalLM._supports_sdpa
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert {layer.mixer.backend for layer in eager.model.layers if layer.mixer.letter in "AS"} == {"eager"}
    with torch.no_grad():
        assert torch.allclose(eager(ids()).logits, model(ids()).logits, atol=1e-5)
    model.set_attn_implementation("eager")
    assert {m.backend for m in mixers} == {"eager"}
    assert tiny("A", attention={"backend": "eager"}).config._attn_implementation == "eager"


@pytest.mark.parametrize("pattern", ["B", "M", "MB", "BCTL", "T", "L", "MAMS"])
def test_generate_continues_a_returned_cache_given_the_full_input_ids(pattern):
    model = tiny(pattern)
    prompt = ids(2, 7)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding
    options = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0, max_new_tokens=3)
    first = model.generate(prompt, attention_mask=mask, **options)
    full = first.sequences
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    continued = model.generate(full, attention_mask=full_mask, cache=first.cache, **options)
    fresh = model.generate(full, attention_mask=full_mask, **options)
    assert torch.equal(continued.sequences, fresh.sequences)
    for a, b in zip(continued.scores, fresh.scores):
        assert torch.allclose(a, b, atol=1e-4)


def test_an_attention_mask_shorter_than_the_cache_and_the_new_tokens_is_refused():
    model = tiny("AM")
    with torch.no_grad():
        cache = model(ids(2, 6)).cache
        with pytest.raises(ValueError, match="attention_mask: covers 1 tokens, fewer than the 6 in the cache"):
            model(ids(2, 1), cache=cache, attention_mask=torch.ones(2, 1, dtype=torch.long))


def test_a_static_cache_is_refused():
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        tiny("AM").generate(ids(), max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("pattern", ["A", "AS"])
def test_torch_export_of_the_plain_forward_with_an_attention_mask(pattern):
    # recurrent mixers are not exportable: the chunked scan's layout depends on data (README, "The model")
    model = tiny(pattern)
    inputs = {"attention_mask": torch.ones(2, 6, dtype=torch.long), "use_cache": False}
    exported = torch.export.export(model, (ids(),), inputs, strict=False)
    with torch.no_grad():
        assert torch.allclose(exported.module()(ids(), **inputs).logits, model(ids(), **inputs).logits, atol=1e-5)
