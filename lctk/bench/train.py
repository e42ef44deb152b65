"""Training throughput on this machine's CPU (bf16 autocast): the quickstart's hybrid against a transformers
LlamaForCausalLM with the same parameter count (same width, heads, MLP and vocabulary; the number of layers chosen
to match the parameters), at T = 2048 and 8192 tokens per row, batch 1; and the same shape with one attention layer in
four (MMMA) to show how the ratio moves with the attention share. One training step = forward, backward and
an AdamW update; each figure is the fastest of a few steps after one warm-up step, side by side in one run, on one
thread: the ratio is the claim, and one thread keeps it steady on a machine shared with other work (two threads
that wait on each other swing it by 2x there).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

LENGTHS = (2048, 8192)
WARMUP_STEPS, TIMED_STEPS = 1, 3
THREADS = 1
SPARSE_PATTERN = "MMMA"
QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def quickstart_model(pattern: str | None = None):
    """The quickstart's model, optionally with another layer pattern of the same length."""
    from lctk.models import HybridForCausalLM
    from lctk.recipe import load_recipe

    recipe = load_recipe(QUICKSTART, [f"model.pattern={pattern}"] if pattern else [], kind="train")
    spec = recipe.tokenizer
    vocab = int(spec.removeprefix("bpe:")) if spec.startswith("bpe:") else 320
    return HybridForCausalLM(recipe.hybrid_config(-(-vocab // 64) * 64))


def matching_llama(hybrid):
    """A Llama as wide as the hybrid, with the layer count whose parameter count is closest to the hybrid's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = hybrid.config
    target = parameters(hybrid)

    def build(layers: int):
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=layers,
                num_attention_heads=config.num_attention_heads,
                num_key_value_heads=config.num_key_value_heads,
                head_dim=config.head_dim,
                tie_word_embeddings=config.tie_word_embeddings,
                attn_implementation="sdpa",
            )
        )

    per_layer = parameters(build(2)) - parameters(build(1))
    layers = max(1, round((target - parameters(build(1))) / per_layer) + 1)
    return build(layers)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tokens_per_second(model, length: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    seconds = []
    for _ in range(WARMUP_STEPS + TIMED_STEPS):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return length / min(seconds[WARMUP_STEPS:])


def run() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        _compare()
    finally:
        torch.set_num_threads(threads)


def _compare() -> None:
    torch.manual_seed(0)
    hybrid = quickstart_model()
    # the same shape with one attention layer in four, the share of most published hybrids
    sparse = quickstart_model(SPARSE_PATTERN)
    llama = matching_llama(hybrid)
    print(
        f"hybrid {hybrid.config.pattern} d={hybrid.config.hidden_size}: {parameters(hybrid) / 1e6:.2f}M parameters "
        f"({SPARSE_PATTERN}: {parameters(sparse) / 1e6:.2f}M); llama {llama.config.num_hidden_layers} layers: "
        f"{parameters(llama) / 1e6:.2f}M parameters; CPU, bf16 autocast, batch 1, {torch.get_num_threads()} thread(s)"
    )
    names = (hybrid.config.pattern, SPARSE_PATTERN)
    print(f"{'T':>6} | " + " | ".join(f"{n + ' tok/s':>11}" for n in (*names, "llama")) + " | "
          + " | ".join(f"{n + ' / llama':>12}" for n in names))
    for length in LENGTHS:
        rates = [tokens_per_second(model, length) for model in (hybrid, sparse, llama)]
        print(f"{length:>6} | " + " | ".join(f"{rate:>11.0f}" for rate in rates) + " | "
              + " | ".join(f"{rate / rates[-1]:>11.2f}x" for rate in rates[:-1]), flush=True)


if __name__ == "__main__":
    run()
