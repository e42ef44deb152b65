"""Scripted models for the eval tests: a perfect retriever, a silent model, a perfect induction head."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch


def expected_answer(prompt: str) -> str:
    """What a perfect retriever says: the passkey, or every value of the queried NIAH key(s), read off the prompt."""
    passkey = re.search(r"The pass key is (\d+)\. Remember it\.", prompt)
    if passkey:
        return " " + passkey[1] + "."
    query = re.search(r"for (.+?) mentioned in the provided text\?", prompt)[1]
    keys = re.split(r", and |, ", query)
    values = [v for key in keys for v in re.findall(rf"for {re.escape(key)} is: (\S+)\.", prompt)]
    return " " + ", ".join(values) + "."


class ScriptedLM(torch.nn.Module):
    """generate() continues every prompt with `answer(prompt text)` then EOS; counts the prompts it saw."""

    def __init__(self, tokenizer, answer, max_position_embeddings: int | None = None):
        super().__init__()
        self.tokenizer, self.answer = tokenizer, answer
        self.config = SimpleNamespace(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.prompts: list[str] = []

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            self.prompts.append(prompt)
            answer = self.tokenizer(self.answer(prompt), add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + answer[: generation_config.max_new_tokens - 1] + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tokenizer.eos_token_id] * (width - len(row)) for row in rows])


class InductionLM(torch.nn.Module):
    """A causal 'perfect induction head': at each position it predicts the token that followed the longest earlier
    match of the current suffix (up to 32 tokens; latest on ties). The cache is the token history, so it runs
    through models.stream like any LM and recalls key-value pairs exactly."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, use_cache=True, **kwargs):
        cache = cache or {"tokens": [], "where": {}}
        history, where = cache["tokens"], cache["where"]
        logits = torch.zeros(input_ids.shape[1], self.config.vocab_size)
        for column, token in enumerate(input_ids[0].tolist()):
            history.append(token)
            t = len(history) - 1
            best, best_length = None, 0
            for j in reversed(where.get(token, [])):
                length = 1
                while length < 32 and j - length >= 0 and history[j - length] == history[t - length]:
                    length += 1
                if length > best_length:
                    best, best_length = j, length
            if best is not None:
                logits[column, history[best + 1]] = 1.0
            if t >= 1:
                where.setdefault(history[t - 1], []).append(t - 1)
        return SimpleNamespace(logits=logits.unsqueeze(0), cache=cache)
