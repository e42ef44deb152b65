"""Packing documents into fixed-length training rows, and the batches each process draws from them.

A row is `seq_len` tokens with three arrays: input_ids, position_ids (restarting at 0 at every document start, the
boundary convention `lctk.models` reads, so no state or attention crosses documents) and labels (the token where it
is a training target, -100 elsewhere; a document's first token is never a target, since the model would predict it
from the previous document). Labels are not shifted: the model shifts them.

Every row source is addressable: `row(i)` is a pure function of i and the seed, so resuming needs only the step
number, and each of N processes takes its own slice of every global batch:

- TextRows: documents (end-of-text appended) cut into pieces of at most seq_len tokens, each a document of its own;
  per epoch the pieces are shuffled (seeded by epoch), concatenated and cut into rows: no padding.
- TaskRows: row i holds task documents drawn from a random source seeded by (seed, source, i), each of a random
  length in [min_length, min(max_length, space left)], stretched to fill the row when no other document would fit
  after it; what is left (only when max_length < seq_len) is padding (labels -100). A document may come out a few
  tokens shorter than asked (the eval generators never exceed a budget), which is padded too.
- Mixture: row k comes from source c_k, with c_k drawn with probabilities proportional to the weights (so weights
  are shares of training tokens); the source's own row index is the number of earlier rows drawn from it.
- StepBatches: micro-batch a of optimizer step s is global rows [m G, (m + 1) G) with m = s * grad_accum + a and
  G = batch_size * world_size; process r takes rows m G + r batch_size ... + batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lctk.evals.tasks.sample import sample_rng

IGNORE = -100


@dataclass
class Row:
    input_ids: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray


class RowSource(Protocol):
    def row(self, index: int) -> Row: ...


def make_row(ids: np.ndarray, starts: np.ndarray, trained: np.ndarray) -> Row:
    """A row from its tokens, a bool mask of document starts and a bool mask of training targets."""
    at = np.arange(len(ids))
    starts = starts.copy()
    starts[0] = True
    position_ids = at - np.maximum.accumulate(np.where(starts, at, 0))
    labels = np.where(trained & ~starts, ids, IGNORE)
    return Row(ids.astype(np.int64), position_ids.astype(np.int64), labels.astype(np.int64))


def cut_pieces(documents: list[np.ndarray], seq_len: int, eos: int | None) -> list[np.ndarray]:
    """Documents (end-of-text appended) cut into pieces of at most seq_len tokens."""
    pieces = []
    for document in documents:
        tokens = np.asarray(document, dtype=np.int64)
        if eos is not None:
            tokens = np.append(tokens, eos)
        pieces.extend(tokens[start : start + seq_len] for start in range(0, len(tokens), seq_len))
    return pieces


def split_held_out(pieces: list[np.ndarray], fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training pieces, held-out pieces): a fixed random share, independent of the run's seed so that runs with
    different seeds are scored on the same text."""
    count = round(fraction * len(pieces))
    if fraction > 0 and len(pieces) > 1:
        count = min(max(count, 1), len(pieces) - 1)
    held = set(np.random.default_rng(0).permutation(len(pieces))[:count].tolist())
    return [p for i, p in enumerate(pieces) if i not in held], [p for i, p in enumerate(pieces) if i in held]


class TextRows:
    def __init__(self, pieces: list[np.ndarray], seq_len: int, seed: int, shuffle: bool = True):
        if sum(map(len, pieces)) < seq_len:
            raise ValueError(f"{sum(map(len, pieces))} tokens do not fill one row of {seq_len}")
        self.pieces, self.seq_len, self.seed, self.shuffle = pieces, seq_len, seed, shuffle
        self.rows_per_epoch = sum(map(len, pieces)) // seq_len
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows_per_epoch

    def row(self, index: int) -> Row:
        epoch, offset = divmod(index, self.rows_per_epoch)
        tokens, starts = self._stream(epoch)
        window = slice(offset * self.seq_len, (offset + 1) * self.seq_len)
        return make_row(tokens[window], starts[window], np.ones(self.seq_len, dtype=bool))

    def _stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.arange(len(self.pieces))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
            pieces = [self.pieces[i] for i in order]
            tokens = np.concatenate(pieces)
            starts = np.zeros(len(tokens), dtype=bool)
            starts[np.cumsum([0, *map(len, pieces[:-1])])] = True
            self._epoch = (epoch, tokens, starts)
        return self._epoch[1], self._epoch[2]


class TaskRows:
    def __init__(self, task, seq_len: int, seed: int, salt: int, pad_id: int):
        self.task, self.seq_len, self.seed, self.salt, self.pad_id = task, seq_len, seed, salt, pad_id

    def row(self, index: int) -> Row:
        rng = sample_rng("train", self.seed, self.salt, index)
        ids, starts, trained = [], [], []
        space = self.seq_len
        while space >= self.task.min_length:
            length = rng.randint(self.task.min_length, min(self.task.max_length, space))
            if space - length < self.task.min_length:  # nothing fits after it: stretch it to fill the row
                length = min(space, self.task.max_length)
            document = self.task.document(rng, length)
            ids.append(document.ids)
            trained.append(document.trained)
            starts.append(np.arange(len(document.ids)) == 0)
            space -= len(document.ids)
        if space:
            ids.append(np.full(space, self.pad_id))
            trained.append(np.zeros(space, dtype=bool))
            starts.append(np.arange(space) == 0)
        return make_row(np.concatenate(ids), np.concatenate(starts), np.concatenate(trained))


class Mixture:
    BLOCK = 4096  # source choices are drawn per block of rows, so any row is found without drawing all before it

    def __init__(self, sources: list[RowSource], weights: list[float], seed: int):
        self.sources = sources
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seed = seed
        self._counts_before = [np.zeros(len(sources), dtype=np.int64)]  # per block: rows of each source before it
        self._cached_block: tuple[int, np.ndarray | None] = (-1, None)

    def source_of(self, index: int) -> tuple[int, int]:
        """(source, that source's row index) of global row `index`."""
        block, offset = divmod(index, self.BLOCK)
        while len(self._counts_before) <= block:
            b = len(self._counts_before) - 1
            counts = np.bincount(self._choices(b), minlength=len(self.sources))
            self._counts_before.append(self._counts_before[b] + counts)
        choices = self._choices(block)
        source = int(choices[offset])
        return source, int(self._counts_before[block][source] + np.count_nonzero(choices[:offset] == source))

    def row(self, index: int) -> Row:
        source, inner = self.source_of(index)
        return self.sources[source].row(inner)

    def _choices(self, block: int) -> np.ndarray:
        if self._cached_block[0] != block:
            rng = np.random.default_rng([self.seed, block, 7])
            self._cached_block = (block, rng.choice(len(self.sources), size=self.BLOCK, p=self.probabilities))
        return self._cached_block[1]


def collate(rows: list[Row]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.stack([getattr(row, name) for row in rows]))
        for name in ("input_ids", "position_ids", "labels")
    }


class StepBatches:
    """step -> this process's micro-batches for that optimizer step (see the module docstring)."""

    def __init__(self, rows: RowSource, batch_size: int, grad_accum: int, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.grad_accum = rows, batch_size, grad_accum
        self.rank, self.world_size = rank, world_size

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        global_batch = self.batch_size * self.world_size
        batches = []
        for micro in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            first = micro * global_batch + self.rank * self.batch_size
            batches.append(collate([self.rows.row(i) for i in range(first, first + self.batch_size)]))
        return batches
