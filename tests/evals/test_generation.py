"""Batched greedy generation (evals.generation) and the batch plan (evals.batching): a batch of left-padded prompts,
prefilled in chunks, gives each prompt's one-at-a-time continuation; the tokens are transformers' greedy ones; rows
leave the batch when they finish; batches hold one length, sized by measurement; prompts are built a batch ahead."""

import threading

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from lctk.errors import UserError
from lctk.evals.api import EvalSettings
from lctk.evals.batching import MAX_ROWS, auto_rows, rows_for, run_batches
from lctk.evals.generation import generate
from lctk.evals.suites.base import EvalContext, Job, Suite
from lctk.models import HybridCache, HybridConfig, HybridForCausalLM
from lctk.sizes import parse_bytes

VOCAB = 4096  # the bpe_tokenizer fixture's


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)
    return LlamaForCausalLM(config).eval()


def mistral() -> MistralForCausalLM:  # sliding-window layers: its rows cannot be joined, so one padded prefill
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16, eos_token_id=0)
    return MistralForCausalLM(config).eval()


def hybrid() -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=64, pattern="AMSG", attention={"window": 8})
    return HybridForCausalLM(config).eval()


def prompts() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.integers(1, VOCAB, size=n) for n in (5, 17, 30)]


@pytest.mark.parametrize("make", [llama, mistral, hybrid], ids=["llama-static-cache", "mistral-sliding", "lctk-hybrid-cache"])
def test_a_chunked_padded_batch_gives_each_prompts_own_continuation(make, bpe_tokenizer):
    model = make()
    budgets = [6, 3, 8]
    alone = [generate(model, bpe_tokenizer, [p], n, prefill_chunk=10**6) for p, n in zip(prompts(), budgets)]
    together = generate(model, bpe_tokenizer, prompts(), budgets, prefill_chunk=7)
    assert together.texts == [a.texts[0] for a in alone]
    assert together.new_tokens == [a.new_tokens[0] for a in alone]
    assert all(n <= budget for n, budget in zip(together.new_tokens, budgets))
    assert together.prefill_seconds > 0 and together.decode_seconds > 0 and together.cache_bytes > 0


def test_the_tokens_are_transformers_greedy_ones(bpe_tokenizer):
    model, prompt = llama(), prompts()[2]
    ours = generate(model, bpe_tokenizer, [prompt], 12, prefill_chunk=8)
    theirs = model.generate(torch.as_tensor(prompt)[None], max_new_tokens=12, do_sample=False, eos_token_id=0,
                            pad_token_id=0)
    assert ours.texts[0] == bpe_tokenizer.decode(theirs[0, len(prompt):], skip_special_tokens=True)


def test_finished_rows_leave_the_batch(bpe_tokenizer, monkeypatch):
    kept = []
    select = HybridCache.batch_select_indices
    monkeypatch.setattr(HybridCache, "batch_select_indices",
                        lambda cache, indices: (kept.append(indices.tolist()), select(cache, indices)))
    out = generate(hybrid(), bpe_tokenizer, prompts(), [2, 9, 5])
    assert out.new_tokens == [2, 9, 5]
    assert kept == [[1, 2], [0]]  # row 0 leaves after 2 tokens, then row 2 (slot 1 of the two left) after 5


class _Recording(Suite):
    name, batched = "recording", True

    def __init__(self):
        self.threads, self.batches = set(), []

    def prepare(self, ctx, job):
        self.threads.add(threading.get_ident())
        return job.index

    def run(self, ctx, jobs, prepared):
        self.batches.append((jobs[0].length, prepared))
        return [{"cache_bytes": 1000} for _ in jobs]


def _todo(lengths_and_counts):
    jobs = [Job("recording", "t", length, i) for length, count in lengths_and_counts for i in range(count)]
    return [(job, str(n)) for n, job in enumerate(jobs)]


def test_batches_hold_one_length_and_auto_sizes_them_from_the_first_row():
    suite = _Recording()
    todo = _todo([(512, 5), (256, 4), (512, 2)])
    ctx = EvalContext(EvalSettings())
    done = list(run_batches(suite, ctx, todo, "auto", budget=3000))
    # lengths in ascending order; one row measured, then budget // 1000 bytes a row = 3 rows
    assert suite.batches == [(256, [0]), (256, [1, 2, 3]), (512, [0]), (512, [1, 2, 3]), (512, [4, 0, 1])]
    assert [pair[1] for batch, _ in done for pair in batch] == ["5", "6", "7", "8", "0", "1", "2", "3", "4", "9", "10"]
    assert all("wall_seconds" in r for _, records in done for r in records)
    assert suite.threads and threading.get_ident() not in suite.threads  # prompts were built off the main thread
    fixed = _Recording()
    list(run_batches(fixed, ctx, todo, 4, budget=None))
    assert [len(prepared) for _, prepared in fixed.batches] == [4, 4, 3]


def test_rows_follow_the_budget_within_bounds():
    assert rows_for(10**6, 8 * 10**6) == 8
    assert auto_rows({"cache_bytes": 10**6}, 2 * 10**6, 8 * 10**6) == 4  # the measured peak, when above the cache
    assert rows_for(10**9, 10**6) == 1  # one row even when it does not fit: the model will say
    assert rows_for(1, 10**12) == MAX_ROWS


def test_batch_size_and_memory_budget_are_checked_as_flags():
    assert parse_bytes("4GB") == parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("512m") == 512 * 2**20
    assert EvalSettings(batch_size="8").batch_size == 8 and EvalSettings().batch_size == "auto"
    assert EvalSettings(memory_budget="1.5GB").memory_budget == int(1.5 * 2**30)
    with pytest.raises(UserError, match=r"^--batch-size: a number of rows or auto, got 'many'$"):
        EvalSettings(batch_size="many")
    with pytest.raises(UserError, match=r"^--memory-budget: cannot read 'lots' as a memory size \(e.g. 512MB, 4GB\)$"):
        EvalSettings(memory_budget="lots")


def test_one_line_answers_and_long_answers_do_not_share_a_batch():
    from lctk.evals.suites.retrieval import RulerSuite

    ruler, ctx = RulerSuite(), EvalContext(EvalSettings(suites="ruler"))
    keys = {task: ruler.batch_key(ctx, Job("ruler", task, 1024, 0)) for task in ("niah_single_1", "vt", "cwe", "fwe")}
    assert keys["niah_single_1"] != keys["cwe"] != keys["fwe"] and keys["cwe"][0] == keys["vt"][0] == 1024

