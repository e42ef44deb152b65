"""Packing documents into fixed-length training rows, and the batches each process draws from them.

A row is `seq_len` tokens with three arrays: input_ids, position_ids (restarting at 0 at every document start, the
boundary convention `lctk.models` reads, so no state or attention crosses documents) and labels (the token where it
is a training target, IGNORE (lctk.labels) elsewhere; a document's first token is never a target, since the model would predict it
from the previous document). Labels are not shifted: the model shifts them.

Every row source is addressable: `row(i)` is a pure function of i and the seed, so resuming needs only the step
number, and each of N processes takes its own slice of every global batch:

- TextRows: documents (end-of-text appended) cut into pieces of at most seq_len tokens, each a document of its own;
  per epoch the pieces are shuffled (seeded by epoch), concatenated and cut into rows: no padding. Pieces are integer
  arrays over a token store (lctk.data.store: document, start and length per piece, 12 bytes), and an epoch is its
  order and the cumulative lengths in that order (16 bytes per piece): a row is found by binary search and read from
  the memory maps, so no process holds a copy of the corpus.
- TaskRows: row i holds task documents drawn from a random source seeded by (seed, source, i), each of a random
  length in [min_length, min(max_length, space left)], stretched to fill the row when no other document would fit
  after it; what is left (only when max_length < seq_len) is padding (labels IGNORE). A document may come out a few
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

from lctk.data.store import TokenStore
from lctk.labels import IGNORE
from lctk.tasks.sample import sample_rng


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


class Pieces:
    """Pieces of at most seq_len tokens cut from the documents of a token store, end-of-text appended to each
    document: piece k is `lengths[k]` tokens of document `document[k]` from `start[k]` (small integer arrays)."""

    def __init__(self, store: TokenStore, document: np.ndarray, start: np.ndarray, lengths: np.ndarray, eos: int | None):
        self.store, self.document, self.start, self.lengths, self.eos = store, document, start, lengths, eos

    @classmethod
    def cut(cls, store: TokenStore, seq_len: int, eos: int | None) -> Pieces:
        sizes = store.lengths() + (eos is not None)
        counts = -(-sizes // seq_len)
        document = np.repeat(np.arange(len(sizes)), counts)
        start = (np.arange(len(document)) - np.repeat(np.cumsum(counts) - counts, counts)) * seq_len
        lengths = np.minimum(seq_len, sizes[document] - start)
        return cls(store, document.astype(np.uint32), start.astype(np.uint32), lengths.astype(np.uint32), eos)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        document = self.store.document(int(self.document[index]))
        start, length = int(self.start[index]), int(self.lengths[index])
        tokens = np.asarray(document[start : start + length], dtype=np.int64)
        return np.append(tokens, self.eos) if start + length > len(document) else tokens

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def take(self, index: np.ndarray) -> Pieces:
        return Pieces(self.store, self.document[index], self.start[index], self.lengths[index], self.eos)


def cut_pieces(documents: list[np.ndarray], seq_len: int, eos: int | None) -> Pieces:
    """Pieces of documents given in memory."""
    return Pieces.cut(TokenStore.from_documents(documents), seq_len, eos)


def split_held_out(pieces: Pieces, fraction: float) -> tuple[Pieces, Pieces]:
    """(training pieces, held-out pieces): a fixed random share, independent of the run's seed so that runs with
    different seeds are scored on the same text."""
    count = round(fraction * len(pieces))
    if fraction > 0 and len(pieces) > 1:
        count = min(max(count, 1), len(pieces) - 1)
    held = np.zeros(len(pieces), dtype=bool)
    held[np.random.default_rng(0).permutation(len(pieces))[:count]] = True
    return pieces.take(np.flatnonzero(~held)), pieces.take(np.flatnonzero(held))


class TextRows:
    def __init__(self, pieces: Pieces, seq_len: int, seed: int, shuffle: bool = True):
        if pieces.tokens < seq_len:
            raise ValueError(f"{pieces.tokens} tokens do not fill one row of {seq_len}")
        self.pieces, self.seq_len, self.seed, self.shuffle = pieces, seq_len, seed, shuffle
        self.rows_per_epoch = pieces.tokens // seq_len
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.rows_per_epoch

    def row(self, index: int) -> Row:
        epoch, offset = divmod(index, self.rows_per_epoch)
        order, ends = self._order(epoch)
        position, end = offset * self.seq_len, (offset + 1) * self.seq_len
        k = int(np.searchsorted(ends, position, side="right"))  # the piece holding the row's first token
        ids, starts = [], []
        while position < end:
            piece = self.pieces[order[k]]
            piece_start = int(ends[k]) - len(piece)
            taken = piece[position - piece_start : end - piece_start]
            ids.append(taken)
            starts.append(np.arange(len(taken)) == piece_start - position)
            position += len(taken)
            k += 1
        return make_row(np.concatenate(ids), np.concatenate(starts), np.ones(self.seq_len, dtype=bool))

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's piece order and the end of each piece in the epoch's token stream."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = np.arange(len(self.pieces))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
            self._epoch = (epoch, order, np.cumsum(self.pieces.lengths[order], dtype=np.int64))
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
