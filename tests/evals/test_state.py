"""State statistics from any cache (transformers' Mamba-2 and Llama caches, lctk's HybridCache), chunked streaming
against a full forward pass, state sizes, and the state-collapse / perplexity suites on a real tiny model."""

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from lctk.evals.api import EvalSettings, run_suites, state_size
from lctk.evals.generation import stream
from lctk.evals.model_facts import cache_of, iter_tensors
from lctk.evals.suites.state_collapse import trace_states
from lctk.tasks.haystacks import corpus_tokens

VOCAB = 4097  # the test BPE tokenizer's vocabulary


@pytest.fixture(scope="module")
def mamba2():
    torch.manual_seed(0)
    config = Mamba2Config(num_heads=4, head_dim=8, vocab_size=VOCAB, hidden_size=16, state_size=8,
                          num_hidden_layers=2, n_groups=1, expand=2, chunk_size=32)
    return Mamba2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


def text_ids(tokenizer, n):
    return corpus_tokens(tokenizer, 0, n)


def test_mamba2_state_statistics_move_as_the_input_grows(mamba2, bpe_tokenizer):
    nll, ends, states = trace_states(mamba2, text_ids(bpe_tokenizer, 256), chunk=64)
    assert ends == [64, 128, 192, 256] and len(nll) == 255
    assert sorted(states) == ["layers.0.conv_states.0", "layers.0.recurrent_states.0",
                              "layers.1.conv_states.0", "layers.1.recurrent_states.0"]
    ssm = states["layers.1.recurrent_states.0"]
    assert ssm["shape"] == [1, 4, 8, 8] and len(ssm["rms"]) == 4 and len(ssm["head_rms"]) == 4
    assert len(set(ssm["rms"])) == 4, "the SSM state must change from chunk to chunk"
    assert all(mx >= rms > 0 for mx, rms in zip(ssm["max"], ssm["rms"], strict=True))
    final = mamba2(input_ids=torch.as_tensor(text_ids(bpe_tokenizer, 256))[None], use_cache=True).cache
    reference = final.layers[1].recurrent_states[0][0].float()
    assert ssm["rms"][-1] == pytest.approx(reference.pow(2).mean().sqrt().item(), rel=1e-4)
    assert ssm["head_max"] == pytest.approx(reference.abs().amax(dim=(1, 2)).tolist(), rel=1e-4)


def test_attention_kv_is_not_a_recurrent_state(llama, bpe_tokenizer):
    _, _, states = trace_states(llama, text_ids(bpe_tokenizer, 200), chunk=50)
    assert states == {}


def test_lctk_hybrid_cache_is_walked_too(bpe_tokenizer):
    from lctk.models import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=VOCAB, hidden_size=32, num_attention_heads=2)).eval()
    _, _, states = trace_states(model, text_ids(bpe_tokenizer, 192), chunk=64)
    assert states and all(path.startswith("states.0.") for path in states)  # the Mamba-2 layer; not the KV of layer 1
    assert any(len(set(trace["rms"])) > 1 for trace in states.values())


@pytest.mark.parametrize("name", ["mamba2", "llama"])
def test_streaming_in_chunks_matches_one_forward(request, name, bpe_tokenizer):
    model = request.getfixturevalue(name)
    ids = text_ids(bpe_tokenizer, 150)
    streamed = torch.cat([step.nll for step, _ in stream(model, ids, chunk=40)])
    logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1]
    reference = torch.nn.functional.cross_entropy(logits, torch.as_tensor(ids[1:]), reduction="none")
    assert torch.allclose(streamed, reference, atol=1e-4)


def test_state_sizes(llama, mamba2):
    assert state_size(llama, 1000) == 2 * 2 * 2 * 8 * 1000  # 2 x layers x kv_heads x head_dim x L
    conv = (2 * 16 + 2 * 8) * 4  # (intermediate + 2 x groups x state) x kernel
    assert state_size(mamba2, 1000) == state_size(mamba2, 10) == 2 * (conv + 4 * 8 * 8)


def test_state_collapse_and_perplexity_suites(mamba2, bpe_tokenizer, tmp_path):
    results = run_suites(mamba2, bpe_tokenizer,
                         EvalSettings(suites="state-collapse,perplexity", lengths=[128, 256], limit=2),
                         output_dir=tmp_path, progress=False, model_name="mamba2")
    collapse, ppl = results["results"]["state-collapse"], results["results"]["perplexity"]
    assert set(collapse["by_length"]) == {"128", "256"} and collapse["score"] == collapse["by_length"]["256"]
    assert 0.5 < collapse["score"] < 2.0 and collapse["state_tensors"] == 4
    assert collapse["newlines_state_growth"]["256"] > 0
    assert ppl["tokens"] == 2 * 127 + 2 * 255
    assert ppl["score"] == pytest.approx(VOCAB, rel=0.5)  # an untrained model is close to uniform
    assert list(ppl["by_position"]) == ["2", "4", "8", "16", "32", "64", "128", "256"]
    per_window = [np.exp(r["nll_sum"] / r["tokens"]) for r in _records(tmp_path, "perplexity")]
    assert ppl["by_length"]["128"] == pytest.approx(np.exp(np.mean(np.log(per_window[:2]))), rel=1e-6)
    for name in ("state_collapse_loss.png", "state_collapse_states.png", "perplexity_by_position.png",
                 "state_collapse_heads_corpus.png", "state_collapse_heads_newlines.png"):
        assert (tmp_path / name).exists()
    # Stuffed Mamba's view: per-head norms over position, and the absolute loss of the newline input
    (record,) = [r for r in _records(tmp_path, "state-collapse") if r["task"] == "newlines" and r["length"] == 256]
    assert collapse["newlines_by_length"]["256"] == record["late_loss"] > 0
    norms = record["states"]["layers.0.recurrent_states.0"]["head_norm"]
    assert np.asarray(norms).shape == (len(record["chunk_ends"]), 4)


def test_mamba2_probe_reads_dt_decay_b_and_x_per_head(bpe_tokenizer):
    """lctk's Mamba-2: the probe sees Δ = softplus(dt + dt_bias), the decay exp(-exp(A_log) Δ), B and x per head."""
    from lctk.evals.suites.state_collapse import mixer_probes
    from lctk.models import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=VOCAB, hidden_size=32, num_attention_heads=2)).eval()
    ids = text_ids(bpe_tokenizer, 128)
    with mixer_probes(model) as stats:
        _, ends, states = trace_states(model, ids, chunk=32)
    (layer,) = stats
    mixer = model.model.layers[0].mixer
    rows = len(stats[layer]["dt"])
    with torch.no_grad():
        model(torch.as_tensor(ids[None, :16]))
    assert set(stats[layer]) == {"dt", "decay", "B", "x"} and len(stats[layer]["dt"]) == rows  # removed on the way out
    dt, decay = np.asarray(stats[layer]["dt"]), np.asarray(stats[layer]["decay"])
    assert dt.shape == decay.shape == (len(ends), mixer.num_heads) and (dt > 0).all()
    assert np.allclose(decay, np.exp(-np.exp(mixer.A_log.detach().numpy()) * dt), rtol=0.2)  # mean of exp vs exp of mean
    assert ((decay > 0) & (decay < 1)).all() and (np.asarray(stats[layer]["B"]) > 0).all()
    ssm = next(t for path, t in states.items() if t["head_norm"])
    assert np.asarray(ssm["head_norm"]).shape == (len(ends), mixer.num_heads)


def test_long_corpus_windows_stay_in_held_out_text(bpe_tokenizer):
    from lctk.tasks.corpus import builtin_documents
    from lctk.tasks.haystacks import heldout_tokens

    ids, repeats_from = heldout_tokens(bpe_tokenizer, 100_000)
    assert len(ids) == 100_000 and 0 < repeats_from < 100_000
    heldout = "\n\n".join(builtin_documents("heldout"))
    for at in (repeats_from - 3000, repeats_from + 500, len(ids) - 2000):  # before and after the first pass ends
        text = bpe_tokenizer.decode(ids[at : at + 1000])
        assert text[100:400] in heldout


def _records(folder, suite):
    import json

    lines = (folder / "samples.jsonl").read_text().splitlines()
    return sorted((r for r in map(json.loads, lines) if r["suite"] == suite), key=lambda r: (r["length"], r["index"]))


def test_sliding_window_state_stops_growing_where_the_installed_cache_does(llama):
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=12)
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        cache = cache_of(model(input_ids=torch.ones((1, 40), dtype=torch.long), use_cache=True))
    held = sum(t.numel() for _, t in iter_tensors(cache) if t.is_floating_point())
    assert state_size(model, 40) == state_size(model, 1000) == held
    assert held <= 2 * 2 * 2 * 8 * 12 < state_size(llama, 40)  # the same shape without a window keeps all 40
