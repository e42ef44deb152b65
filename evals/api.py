"""lctk.evals.api, the public surface of lctk.evals: evaluation suites for any Hugging Face causal LM (lctk models, Llama, transformers' Mamba-2, ...).

Suites (`lctk eval --suite ...`): passkey, niah (RULER tasks + the classic depth x length grid), state-collapse,
recall-throughput, perplexity. Each suite = seeded sample generator (exact token budgets) + scorer + plots; results
follow one schema (results.json: {"model", "results": {suite: {"score", "by_length", ...}}, "settings", "config", "versions",
"seed", "timings", "files"}; samples.jsonl: one record per finished job) and a rerun into the same folder resumes
the samples of the same weights and tokenizer (evals.fingerprints.weights_fingerprint, lctk.tasks.tokens.fingerprint).
Evals never import training code. (`lctk.evals` itself is a namespace package: see lctk/__init__.py.)

Python API
----------
Run suites on a loaded model (the trainer does this at the end of training)::

    from lctk.evals.api import EvalSettings, run_suites, load_model
    model, tokenizer = load_model("runs/quickstart/final")           # or any model + tokenizer in memory
    settings = EvalSettings(suites="passkey,niah_single_1", lengths="512,1k", limit=20, seed=0)
    results = run_suites(model, tokenizer, settings, output_dir="runs/quickstart/eval")
    results["results"]["passkey"]["score"]          # accuracy in %, also ["by_length"]["512"], ["grid"], ...

EvalSettings holds everything that needs no model, one field per `lctk eval` flag (suites, lengths, limit, seed,
depths, batch_size, max_new_tokens, allow_longer, exact, chat_template, haystack, qa_data, lm_eval, lm_eval_limit,
lm_eval_include), checked when made; results.json records it under "settings".
run_suites(model, tokenizer, settings, output_dir=None, model_name="model", progress=True, config=None) -> dict.
Without output_dir nothing is written (no plots). Bad input raises lctk.errors.UserError with one line. Lengths above
the model's limit (model_facts.length_limit) need allow_longer=True.

Sample generators, usable on their own to build training data (every sample has prompt, input_ids (exactly
tokenizer(prompt)["input_ids"], never more than length - reserve tokens, at most a few under), answers, target (the
canonical answer continuation, e.g. " 12345."), depth, offsets, meta)::

    import random
    from lctk.tasks import passkey, niah, recall
    s = passkey.make_sample(tokenizer, length=2048, depth=0.5, rng=random.Random(0), reserve=16)
    s = niah.make_sample(tokenizer, "niah_multikey_2", length=4096, rng=random.Random(1))   # niah.TASKS
    s = recall.make_text_recall_sample(tokenizer, length=1024, rng=random.Random(2))        # teacher-forced
    m = recall.make_mqar_sample(length=256, rng=random.Random(3), vocab_size=8192)         # .input_ids, .labels

    # a training example: prompt + answer, loss on the answer only
    ids = list(s.input_ids) + tokenizer(s.target, add_special_tokens=False)["input_ids"]

The prompts splice cached haystack tokens (lctk.tasks.prompts), so thousands of 128K-token samples take seconds;
`exact=True` also checks every prompt against a tokenisation of its whole text.
"""

from lctk.evals.loading import load_model
from lctk.evals.model_facts import state_size
from lctk.evals.runner import compare, run_suites
from lctk.evals.settings import EvalSettings, parse_lengths, parse_suites
from lctk.evals.suites import SUITES
from lctk.tasks.sample import Sample, sample_rng

__all__ = [
    "SUITES",
    "EvalSettings",
    "Sample",
    "compare",
    "load_model",
    "parse_lengths",
    "parse_suites",
    "run_suites",
    "sample_rng",
    "state_size",
]
