"""Running any Hugging Face causal LM for the evals: greedy generation of a batch of prompts (stopping one-line answers
at their newline) and chunked streaming of a long input through the model's cache."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lctk.evals.model_facts import cache_of, model_device


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int, one_line: list[bool] | None = None
) -> list[str]:
    """Greedy continuations of a batch of prompts (left-padded when their lengths differ), decoded without specials.

    Each row stops at the end-of-text token; a row marked in `one_line` also stops at the first newline after a
    letter or digit (its answer is one line: the rest is never scored; a leading ":" or blank line is not the
    answer yet), and its output is cut there."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = model_device(model)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    rows = list(one_line or [False] * len(prompts))
    stopping = StoppingCriteriaList([_LineEnd(tokenizer, width, rows)]) if any(rows) else None
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         stopping_criteria=stopping)
    texts = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out.cpu()]
    return [_first_line(text) if cut else text for text, cut in zip(texts, rows, strict=True)]


def _first_line(text: str) -> str:
    """The text up to the first newline after its first letter or digit (all of it when there is none)."""
    start = next((i for i, char in enumerate(text) if char.isalnum()), len(text))
    end = text.find("\n", start)
    return text if end < 0 else text[:end]


class _LineEnd:
    """Stopping criterion: per row, True once a one-line row has written a newline after a letter or digit."""

    def __init__(self, tokenizer, width: int, rows: list[bool]):
        self.tokenizer, self.width, self.rows = tokenizer, width, rows

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, one_line in enumerate(self.rows):
            if one_line:
                text = self.tokenizer.decode(input_ids[row, self.width :], skip_special_tokens=True)
                done[row] = _first_line(text) != text
        return done


@dataclass
class Step:
    end: int  # tokens fed so far
    nll: torch.Tensor  # (tokens predicted in this chunk,)
    hits: torch.Tensor  # bool, same shape
    predicted: torch.Tensor  # the argmax token at each of those positions


@torch.no_grad()
def stream(model, ids: np.ndarray, chunk: int) -> Iterator[tuple[Step, object]]:
    """Feed ids chunk by chunk through the model's cache; yields (the chunk's per-token results, the cache).

    Token t (t >= 1) gets nll = -log p(ids[t] | ids[:t]), predicted = the argmax of that distribution and hit =
    (predicted == ids[t]); token 0 has none,
    so over the whole stream the results cover ids[1:] in order."""
    device = model_device(model)
    tokens = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=device).unsqueeze(0)
    cache, carried = None, None  # carried: the last logit of the previous chunk (it predicts this chunk's first token)
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start : start + chunk]
        outputs = model(input_ids=piece, use_cache=True, **({"cache": cache} if cache is not None else {}))
        cache = cache_of(outputs)
        logits = outputs.logits[0].float()
        if carried is not None:
            logits, targets = torch.cat([carried, logits[:-1]]), piece[0]
        else:
            logits, targets = logits[:-1], piece[0, 1:]
        carried = outputs.logits[0, -1:].float()
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        predicted = logits.argmax(-1)
        yield Step(start + piece.shape[1], nll.cpu(), (predicted == targets).cpu(), predicted.cpu()), cache
