"""Packing: rows carry document boundaries, every source is addressable and deterministic, mixtures follow their
weights, and processes split each global batch without overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctk.data.packing import (
    IGNORE,
    Mixture,
    StepBatches,
    TaskRows,
    TextRows,
    cut_pieces,
    make_row,
    split_held_out,
)
from lctk.data.tasks import Task
from lctk.data.tokenizer import build_tokenizer


def documents(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 250, size=rng.integers(3, 40)) for _ in range(count)]


def test_make_row_restarts_positions_and_masks_document_starts():
    ids = np.array([5, 6, 7, 8, 9, 10])
    starts = np.array([False, False, True, False, False, True])
    trained = np.array([True, True, True, True, False, True])
    row = make_row(ids, starts, trained)
    assert row.position_ids.tolist() == [0, 1, 0, 1, 2, 0]
    assert row.labels.tolist() == [IGNORE, 6, IGNORE, 8, IGNORE, IGNORE]


def test_pieces_append_end_of_text_and_respect_seq_len():
    pieces = cut_pieces([np.arange(10), np.arange(3)], seq_len=4, eos=99)
    assert [pieces[i].tolist() for i in range(len(pieces))] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99], [0, 1, 2, 99]]


def test_held_out_split_is_disjoint_and_independent_of_the_run_seed():
    pieces = cut_pieces(documents(200), seq_len=16, eos=255)
    train, held = split_held_out(pieces, 0.1)
    assert len(held) == round(0.1 * len(pieces)) and len(train) + len(held) == len(pieces)
    places = {(d, s) for d, s in zip(train.document.tolist(), train.start.tolist())}
    assert places.isdisjoint(zip(held.document.tolist(), held.start.tolist()))
    assert train.tokens + held.tokens == pieces.tokens
    again = split_held_out(pieces, 0.1)[1]
    assert np.array_equal(again.document, held.document) and np.array_equal(again.start, held.start)


def test_text_rows_are_the_shuffled_pieces_without_padding():
    pieces = cut_pieces(documents(50), seq_len=16, eos=255)
    rows = TextRows(pieces, seq_len=16, seed=3)
    epoch = np.concatenate([rows.row(i).input_ids for i in range(len(rows))])
    assert len(epoch) == 16 * len(rows)
    order = np.random.default_rng([3, 0]).permutation(len(pieces))
    assert np.array_equal(epoch, np.concatenate([pieces[i] for i in order])[: len(epoch)])
    # positions restart at every piece start (and at each row start)
    row = rows.row(1)
    assert (row.labels[row.position_ids == 0] == IGNORE).all()
    assert not np.array_equal(rows.row(len(rows)).input_ids, rows.row(0).input_ids)  # next epoch, new order
    assert np.array_equal(TextRows(pieces, 16, seed=3).row(5).input_ids, rows.row(5).input_ids)


def test_mixture_follows_weights_and_enumerates_each_source_in_order():
    mixture = Mixture([None, None, None], [1.0, 2.0, 1.0], seed=0)
    located = [mixture.source_of(i) for i in range(3 * Mixture.BLOCK + 17)]
    shares = np.bincount([s for s, _ in located], minlength=3) / len(located)
    assert np.allclose(shares, [0.25, 0.5, 0.25], atol=0.02)
    for source in range(3):
        inner = [i for s, i in located if s == source]
        assert inner == list(range(len(inner)))
    fresh = Mixture([None] * 3, [1.0, 2.0, 1.0], seed=0)
    assert fresh.source_of(2 * Mixture.BLOCK + 5) == located[2 * Mixture.BLOCK + 5]  # random access


def test_two_processes_split_the_global_batch_of_one():
    rows = TextRows(cut_pieces(documents(80), 16, 255), seq_len=16, seed=0)
    single = StepBatches(rows, batch_size=4, grad_accum=2)
    halves = [StepBatches(rows, batch_size=2, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    for step in (0, 3):
        for micro in range(2):
            together = torch.cat([halves[0](step)[micro]["input_ids"], halves[1](step)[micro]["input_ids"]])
            assert torch.equal(together, single(step)[micro]["input_ids"])
    assert not torch.equal(single(0)[0]["input_ids"], single(0)[1]["input_ids"])


@pytest.mark.parametrize("name", ["copy", "mqar"])
def test_task_rows_are_full_length_deterministic_and_trained_only_on_answers(name):
    tokenizer = build_tokenizer("bytes", None, None)
    task = Task(name, {"vocab_size": 64}, tokenizer, seq_len=48, key="data.sources.0")
    rows = TaskRows(task, seq_len=48, seed=1, salt=0, pad_id=tokenizer.eos_token_id)
    row = rows.row(7)
    assert len(row.input_ids) == 48 and np.array_equal(rows.row(7).input_ids, row.input_ids)
    assert not np.array_equal(rows.row(8).input_ids, row.input_ids)
    targets = row.labels != IGNORE
    assert 0 < targets.sum() < 48 / 2 + 1
    assert (row.labels[targets] == row.input_ids[targets]).all()


def test_packed_documents_do_not_leak_into_each_other():
    """The loss of each document inside a packed row equals its loss on its own (attention and Mamba-2 layers)."""
    from lctk.models import HybridConfig, HybridForCausalLM
    from lctk.train.trainer import causal_lm_loss

    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern="MA", vocab_size=256, hidden_size=32, num_attention_heads=2,
                                           mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 8})).eval()
    docs = documents(3, seed=5)
    ids = np.concatenate(docs)
    starts = np.zeros(len(ids), dtype=bool)
    starts[np.cumsum([0, *map(len, docs[:-1])])] = True
    row = make_row(ids, starts, np.ones(len(ids), dtype=bool))
    packed = {k: torch.from_numpy(getattr(row, k))[None] for k in ("input_ids", "position_ids", "labels")}
    alone = 0.0
    with torch.no_grad():
        for doc in docs:
            single = make_row(doc, np.zeros(len(doc), dtype=bool), np.ones(len(doc), dtype=bool))
            alone += float(causal_lm_loss(model, {k: torch.from_numpy(getattr(single, k))[None]
                                                  for k in ("input_ids", "position_ids", "labels")}))
        assert float(causal_lm_loss(model, packed)) == pytest.approx(alone, rel=1e-5)
