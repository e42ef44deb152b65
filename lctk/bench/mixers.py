"""Every mixer letter in a same-size model on this CPU: training tokens/s (forward + backward) and decoding
tokens/s with a 2K and an 8K context, and the decoding state in bytes at 8K vs 2K (recurrent mixers stay
flat, global attention grows with the context).

Model: 2 layers of the letter, hidden 256, 4 heads, vocab 4096, fp32, batch 1, each mixer with its default
settings (S and the windows inside T and L: 512 / 512 / 2048 tokens; T = MAG, chunks of 64; L chunks of 2048; G: 3 heads
of 64 with values of 128; K: 4 heads of 64, a decay per channel).
Run: `python -m lctk.bench mixers`.
"""

from __future__ import annotations

import time

import torch

from lctk.models import HybridCache, HybridConfig, HybridForCausalLM

LETTERS = {
    "A": {},
    "S": {},
    "M": {},
    "B": {},
    "C": {},
    "T": {},
    "T/MAC": {"titans": {"variant": "MAC"}},
    "T/MAL": {"titans": {"variant": "MAL"}},
    "L": {},
    "G": {},
    "K": {},
}
CONTEXTS = (2048, 8192)
DECODE_STEPS = 16
VOCAB = 4096


def build(letter: str, sections: dict) -> HybridForCausalLM:
    torch.manual_seed(0)
    config = HybridConfig(
        pattern=letter[0] * 2,
        hidden_size=256,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        **sections,
    )
    return HybridForCausalLM(config)


def train_rate(model: HybridForCausalLM, length: int) -> float:
    model.train()
    ids = torch.randint(0, VOCAB, (1, length))
    start = time.perf_counter()
    model(ids, labels=ids, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
    return length / (time.perf_counter() - start)


@torch.no_grad()
def decode_rate(model: HybridForCausalLM, length: int) -> tuple[float, int]:
    """(decoded tokens/s after a `length`-token prefill, cache bytes after the prefill)."""
    model.eval()
    cache = HybridCache.for_model(model, batch_size=1)
    logits = model(torch.randint(0, VOCAB, (1, length)), cache=cache).logits
    state_bytes = cache.nbytes()
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(DECODE_STEPS):
        token = model(token, cache=cache).logits.argmax(-1)
    return DECODE_STEPS / (time.perf_counter() - start), state_bytes


def run() -> None:
    print(
        f"2 layers, hidden 256, fp32, batch 1, torch threads {torch.get_num_threads()}; "
        f"decode = {DECODE_STEPS} tokens"
    )
    header = f"{'mixer':<6} {'params':>7} " + " ".join(
        f"{name + ' ' + str(n // 1024) + 'K':>13}"
        for name in ("train tok/s", "decode tok/s")
        for n in CONTEXTS
    )
    print(header + f" {'state 2K':>10} {'state 8K':>10} {'8K/2K':>6}")
    for letter, sections in LETTERS.items():
        model = build(letter, sections)
        train_rate(model, 256)  # warm-up
        trains = [train_rate(model, n) for n in CONTEXTS]
        decodes, states = zip(*(decode_rate(model, n) for n in CONTEXTS))
        params = sum(p.numel() for p in model.model.layers.parameters()) / 1e6
        cells = " ".join(f"{rate:>13.0f}" for rate in (*trains, *decodes))
        print(
            f"{letter:<6} {params:>6.2f}M {cells} {states[0] / 2**20:>8.2f}MB {states[1] / 2**20:>8.2f}MB"
            f" {states[1] / states[0]:>6.2f}",
            flush=True,
        )
