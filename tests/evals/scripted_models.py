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
    """Continues every prompt with `answer(prompt text)` then EOS, through forward() and a cache as a real LM does:
    calls with logits_to_keep=1 are prefill (their tokens extend the prompt), others feed back what it answered.
    `prompts`: every prompt it was given, in order."""

    def __init__(self, tokenizer, answer, max_position_embeddings: int | None = None):
        super().__init__()
        self.tokenizer, self.answer = tokenizer, answer
        self.config = SimpleNamespace(vocab_size=len(tokenizer), max_position_embeddings=max_position_embeddings)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.caches: list[ScriptedCache] = []

    @property
    def prompts(self) -> list[str]:
        return [text for cache in self.caches for text in cache.prompts]

    def forward(self, input_ids, attention_mask, cache=None, logits_to_keep=0, **kwargs):
        if cache is None:
            cache = ScriptedCache(input_ids.shape[0])
            self.caches.append(cache)
        new = attention_mask[:, -input_ids.shape[1] :].bool()
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        for row, (ids, real) in enumerate(zip(input_ids, new, strict=True)):
            tokens = cache.rows[row]
            if logits_to_keep == 1:  # prefill: the prompt grows, and so does what it will answer
                tokens.prompt += ids[real].tolist()
                text = self.tokenizer.decode(tokens.prompt, skip_special_tokens=True)
                cache.prompts[tokens.index] = text
                tokens.answer = self.tokenizer(self.answer(text), add_special_tokens=False)["input_ids"]
            else:
                tokens.fed += 1
            script = tokens.answer + [self.tokenizer.eos_token_id]
            logits[row, 0, script[min(tokens.fed, len(script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, cache=cache)


class ScriptedCache:
    def __init__(self, rows: int):
        self.rows = [SimpleNamespace(index=i, prompt=[], answer=[], fed=0) for i in range(rows)]
        self.prompts = [""] * rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in indices.tolist()]


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
