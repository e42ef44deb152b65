"""Tiny teachers built in the tests: Llama with 4 query heads and 2 kv heads (plus Qwen2 / Mistral variants)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lctk  # noqa: F401  (registers the hybrid with the Auto classes)

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_llama(vocab_size: int = 320, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**TINY, **overrides})).eval()


def save_teacher(folder):
    """An (untrained) tiny Llama saved with the byte tokenizer, as `distill.teacher` reads it."""
    from lctk.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("bytes", None, None)
    model = tiny_llama(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
