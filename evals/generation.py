"""Running any Hugging Face causal LM for the evals: batched greedy generation (chunked prefill into a cache
allocated once, rows leaving the batch as they finish) and chunked streaming of a long input through the model's
cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lctk.evals.model_facts import cache_of, iter_tensors, model_device
from lctk.models.cache import preallocated_cache, runs_on_a_static_cache

PREFILL_CHUNK = 2048  # tokens per prefill call, at least: bounds activations and attention scores to chunk x context
# chunk x cache length allowed per call (8K x 8K): a preallocated cache's attention reads its whole buffer under a mask
# at every chunk, so short chunks into a long cache redo the masked work (an 8K prompt in 2K chunks took 2x one call)
PREFILL_SCORES = 8192 * 8192


def prefill_chunk_for(max_length: int) -> int:
    return max(PREFILL_CHUNK, PREFILL_SCORES // max_length)


@dataclass
class Generation:
    texts: list[str]
    new_tokens: list[int]  # tokens generated per row (its stop token included)
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: int  # the cache's tensors once prefilled, all rows


@torch.no_grad()
def generate(model, tokenizer, prompts: list[np.ndarray], max_new_tokens: int | list[int],
             one_line: list[bool] | None = None, prefill_chunk: int | None = None) -> Generation:
    """Greedy continuations of a batch of prompts, decoded without specials.

    Prompts are prefilled `prefill_chunk` tokens at a time (default: prefill_chunk_for the cache's length) into a
    cache sized once for the widest prompt + the longest budget (lctk's HybridCache, transformers' StaticCache where
    the class runs on one; lctk.models.cache.preallocated_cache): each row alone and then joined where that cache
    allows it (_prefill_rows_alone), else left-padded together under a mask (_prefill_padded). A row stops at the
    end-of-text token, at its own budget (`max_new_tokens`, one per row or one for all), and, when marked in `one_line`, at the first newline after a
    letter or digit (its answer is one line: the rest is never scored; a leading ":" or blank line is not the answer
    yet), its output cut there. Finished rows leave the batch (_drop_rows), so one long answer does not hold every
    row's decode."""
    device = model_device(model)
    rows = len(prompts)
    budgets = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    cut = list(one_line or [False] * rows)
    width = max(len(p) for p in prompts)
    prefill_chunk = prefill_chunk or prefill_chunk_for(width + max(budgets))
    started = time.perf_counter()
    alone = _prefill_rows_alone(model, prompts, width + max(budgets), prefill_chunk, device)
    if alone is not None:
        cache, logits, mask = alone
        next_position = mask.sum(-1, keepdim=True)
    else:
        cache, logits, mask = _prefill_padded(model, tokenizer, prompts, width + max(budgets), prefill_chunk, device)
        next_position = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:] + 1
    _synchronize(device)
    prefilled = time.perf_counter()
    cache_bytes = sum(t.numel() * t.element_size() for _, t in iter_tensors(cache))

    written: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    live = torch.arange(rows)  # the rows in the cache, in its order (finished ones stay where it cannot drop rows)
    while True:
        tokens = logits.argmax(-1).cpu()
        for slot, row in enumerate(live.tolist()):
            if not finished[row]:
                written[row].append(int(tokens[slot]))
                finished[row] = _finished(tokenizer, written[row], budgets[row], cut[row])
        if all(finished):
            break
        keep = torch.tensor([not finished[row] for row in live.tolist()]).nonzero().flatten()
        if len(keep) < len(live) and _drop_rows(cache, keep.to(device)):
            live, tokens = live[keep], tokens[keep]
            mask, next_position = mask[keep.to(device)], next_position[keep.to(device)]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        out = model(input_ids=tokens.view(-1, 1).to(device), attention_mask=mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        cache, logits = cache_of(out), out.logits[:, -1]
        next_position = next_position + 1
    _synchronize(device)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in written]
    return Generation(
        texts=[_first_line(text) if one else text for text, one in zip(texts, cut, strict=True)],
        new_tokens=[len(row) for row in written],
        prefill_seconds=prefilled - started,
        decode_seconds=time.perf_counter() - prefilled,
        cache_bytes=cache_bytes,
    )


def _prefill_padded(model, tokenizer, prompts, max_length: int, chunk: int, device):
    """All rows in one forward per chunk, left-padded under a mask: (cache, last logits [B, V], mask [B, width])."""
    rows, width = len(prompts), max(len(p) for p in prompts)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = preallocated_cache(model, rows, max_length)
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                    cache=cache, use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
    return cache, out.logits[:, -1], mask


def _prefill_rows_alone(model, prompts, max_length: int, chunk: int, device):
    """Each row prefilled by itself, then the rows' caches joined: (cache, last logits [B, V], mask [B, width]) for a
    transformers model on a StaticCache of plain layers when the prompts' lengths differ; None otherwise.

    A left-padded batch needs a padding mask, and with one SDPA leaves its causal kernel: on a CPU a masked call takes
    2.2x an is_causal one (8 rows x 2K, SmolLM2's heads; BENCHMARKS.md). Alone, a row needs no mask. Joined, row r's
    keys fill slots [0, len_r) and decoding writes every row at slot `width` onwards: the mask hides the gap
    [len_r, width) and the positions continue at len_r. (lctk's own attention already cuts padded rows into unmasked
    runs, and a cache whose rows hold position-dependent layouts, such as sliding-window rings, cannot be joined.)"""
    from transformers.cache_utils import StaticLayer

    if len({len(p) for p in prompts}) == 1 or not runs_on_a_static_cache(model):
        return None
    caches = [preallocated_cache(model, 1, max_length) for _ in prompts]  # buffers come at the first write
    if not all(type(layer) is StaticLayer for layer in caches[0].layers):  # e.g. sliding-window layers
        return None
    logits = []
    for prompt, cache in zip(prompts, caches, strict=True):
        ids = torch.as_tensor(prompt, dtype=torch.long, device=device)[None]
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1])
    joined, width = caches[0], max(len(p) for p in prompts)
    for index, layer in enumerate(joined.layers):
        layer.keys = torch.cat([cache.layers[index].keys for cache in caches])
        layer.values = torch.cat([cache.layers[index].values for cache in caches])
        layer.batch_size = len(caches)
        layer.cumulative_length.fill_(width)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        mask[row, : len(prompt)] = 1
    return joined, torch.cat(logits), mask


def _finished(tokenizer, written: list[int], budget: int, one_line: bool) -> bool:
    if len(written) >= budget or written[-1] == tokenizer.eos_token_id:
        return True
    if not one_line or "\n" not in tokenizer.decode(written[-1:]):  # only a newline can end a one-line answer
        return False
    text = tokenizer.decode(written, skip_special_tokens=True)
    return _first_line(text) != text


def _drop_rows(cache, keep: torch.Tensor) -> bool:
    """Keep only rows `keep` of the cache, if it can drop rows: a cache with batch_select_indices on every layer
    (lctk's HybridCache, transformers' DynamicCache), or transformers' StaticCache of plain StaticLayers, which
    lacks it (its buffers are then cut to the kept rows: new tensors, so not for a compiled or graph-captured
    decode, which this is not). False for other caches: their finished rows run on to the batch's end."""
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if hasattr(cache, "batch_select_indices") and (
            layers is None or all(hasattr(layer, "batch_select_indices") for layer in layers)):
        cache.batch_select_indices(keep)
        return True
    if layers and all(type(layer) is StaticLayer for layer in layers):
        for layer in layers:
            layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            layer.batch_size = len(keep)
        return True
    return False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_line(text: str) -> str:
    """The text up to the first newline after its first letter or digit (all of it when there is none)."""
    start = next((i for i, char in enumerate(text) if char.isalnum()), len(text))
    end = text.find("\n", start)
    return text if end < 0 else text[:end]


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
