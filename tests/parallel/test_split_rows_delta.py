"""Context parallelism for the delta-rule mixers (`G`, `K`) on CPU processes over gloo: rows split over 2 and 4
processes give the logits and parameter gradients of one process on the whole rows (fp32), with and without packed
documents (boundaries inside shards, at shard edges, and a document spanning 3 shards). The state passes between
shards as S_end = M S_in + F (lctk.parallel.context.ContextShard.carry_affine_states)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_split_rows import PACKED, VOCAB, batch_of, free_port, probe, relative_error, run
from torch import nn

from lctk import HybridConfig, HybridForCausalLM
from lctk.parallel.context import ContextGroup, shard_batch

PATTERNS = ("GK", "KAGS")
SECTIONS = dict(gated_deltanet={"num_heads": 2, "head_dim": 8, "chunk_size": 4},
                kda={"num_heads": 2, "head_dim": 8, "chunk_size": 4}, attention={"window": 5})


def tiny_model(pattern: str) -> HybridForCausalLM:
    """In float64, so that the split and the whole rows agree to rounding and a wrong carry cannot hide below it."""
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                                           **SECTIONS))
    with torch.no_grad():  # larger projections than the default init: errors are not hidden by flat logits
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.25)
    return model.double()


def cases() -> list[tuple[str, list[list[int]] | None]]:
    return [(pattern, documents) for pattern in PATTERNS for documents in (None, PACKED)]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        context = ContextGroup(world, rank, dist.new_group(list(range(world))), 0, 1)
        results = {}
        for index, (pattern, documents) in enumerate(cases()):
            sharded = shard_batch(batch_of(documents, 2, seed=index), context)
            shard = sharded["context_shard"]
            tokens = slice(shard.start, shard.stop)
            logits, grads = run(tiny_model(pattern), sharded, probe(2, index)[:, tokens], shard)
            for grad in grads.values():  # the row's gradient: the sum over shards
                dist.all_reduce(grad)
            results[index] = (tokens, logits, grads)
        torch.save(results, f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4], ids=["cp2", "cp4"])
def test_split_rows_match_one_process(world, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(world, free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    shards = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(world)]
    for index, (pattern, documents) in enumerate(cases()):
        expected_logits, expected_grads = run(tiny_model(pattern), batch_of(documents, 2, seed=index), probe(2, index))
        logits = torch.zeros_like(expected_logits)
        for tokens, shard_logits, _ in (results[index] for results in shards):
            logits[:, tokens] = shard_logits
        name = f"{pattern} {'packed' if documents else 'one document'}"
        assert relative_error(logits, expected_logits) < 1e-10, name
        grads = shards[0][index][2]
        assert grads.keys() == expected_grads.keys()
        for key, expected in expected_grads.items():
            assert relative_error(grads[key], expected) < 1e-10, f"{name}: {key}"
