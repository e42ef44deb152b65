"""Batches for the batched suites: jobs of one batch key together (Suite.batch_key: one length, so that prompts pad to
nearly one width, and for generation one answer budget, so that short answers do not wait for long ones), as many
rows as a memory budget holds, and the per-sample work (prepare) done in a thread a batch ahead of the model.

Rows per batch: `batch_size` when it is a number; with "auto", the first batch of each key is one row whose peak
memory (evals.memory.peak_memory: CUDA's allocator peak, or the growth of the process's resident set on CPU) and
cache bytes are measured, and the rest of that key run budget // max(peak, cache bytes) rows, at most MAX_ROWS.
The budget (--memory-budget) defaults to 80% of the free GPU memory or half the memory the system has available."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby, islice

import torch

from lctk.evals.memory import peak_memory

MAX_ROWS = 64  # rows share one read of the weights per step; past some tens of rows the caches' reads dominate


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(0.5 * psutil.virtual_memory().available)


def rows_for(per_row_bytes: int, budget: int) -> int:
    return max(1, min(MAX_ROWS, budget // max(per_row_bytes, 1)))


def run_batches(suite, ctx, todo: list, batch_size: int | str, budget: int | None) -> Iterator[tuple[list, list[dict]]]:
    """Yields (the batch's (job, key) pairs, their records) for `todo` [(job, key)], records timed per row
    ("wall_seconds": the batch's wall time, waiting for its prompts included, over its rows)."""
    if not suite.batched:
        batch_size = 1

    def batch_key(pair):
        return suite.batch_key(ctx, pair[0])

    ordered = sorted(todo, key=batch_key)  # stable: within a key, the suite's order
    budget = budget or default_budget(ctx.device)
    for _, group in groupby(ordered, key=batch_key):
        group = list(group)
        prepared = _prefetched(lambda pair: suite.prepare(ctx, pair[0]), group,
                               ahead=MAX_ROWS if batch_size == "auto" else batch_size)
        rows = 1 if batch_size == "auto" else batch_size
        at = 0
        while at < len(group):
            batch = group[at : at + rows]
            started = time.perf_counter()
            ready = list(islice(prepared, len(batch)))
            probing = batch_size == "auto" and at == 0  # only the one-row probe is measured: it sizes the rest
            with peak_memory(ctx.device) if probing else contextlib.nullcontext({}) as peak:
                records = suite.run(ctx, [job for job, _ in batch], ready)
            seconds = time.perf_counter() - started
            for record in records:
                record["wall_seconds"] = round(seconds / len(batch), 4)
            yield batch, records
            at += len(batch)
            if probing:
                rows = auto_rows(records[0], peak["bytes"], budget)


def auto_rows(probe: dict, peak_bytes: int, budget: int) -> int:
    """Rows for the rest of a key, from its one-row probe: its peak memory or its cache, whichever is larger."""
    return rows_for(max(peak_bytes, probe.get("cache_bytes", 0)), budget)


def _prefetched(work: Callable, items: Iterable, ahead: int) -> Iterator:
    """work(item) for each item in order, computed in one thread up to `ahead` items before they are taken."""
    items = iter(items)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        pending = deque(pool.submit(work, item) for item in islice(items, ahead))
        while pending:
            result = pending.popleft().result()
            following = next(items, None)
            if following is not None:
                pending.append(pool.submit(work, following))
            yield result
    finally:  # a failed batch does not wait for prompts nobody will use
        pool.shutdown(wait=False, cancel_futures=True)
