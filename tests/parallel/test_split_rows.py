"""Context parallelism (lctk.parallel.context) on CPU processes over gloo: rows split over 2 and 4 processes give the
per-token logits and parameter gradients of one process on the whole rows (fp32), for `MAMS`, `BCBS` and `A`, with
packed documents whose boundaries fall inside shards, exactly at shard edges, and one spanning 3 shards; dp x cp =
2 x 2 on 4 processes equals one process on the same global batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lctk import HybridConfig, HybridForCausalLM
from lctk.errors import UserError
from lctk.parallel.context import ContextGroup, check_context_parallel, shard_batch

LENGTH, VOCAB = 32, 61
PATTERNS = ("MAMS", "BCBS", "A")
# small chunks and windows: shards of 8 tokens cross chunk edges, and `S` and the convolutions reach into the
# previous shard
SECTIONS = dict(
    attention={"window": 5},
    mamba2={"state_size": 8, "head_dim": 16, "chunk_size": 4},
    based={"feature_dim": 4, "chunk_size": 4},
)
# documents of each row: lengths summing to LENGTH
PACKED = [
    [5, 3, 8, 16],  # boundaries inside a shard (5), at the 4-way edge 8 and the 2- and 4-way edge 16
    [3, 26, 3],  # one document over 4 shards of 8 (3 of 16)
]


def positions(documents: list[list[int]] | None, rows: int) -> torch.Tensor:
    if documents is None:
        return torch.arange(LENGTH).expand(rows, -1).clone()
    return torch.stack([torch.cat([torch.arange(n) for n in documents[row % len(documents)]]) for row in range(rows)])


def tiny_model(pattern: str) -> HybridForCausalLM:
    torch.manual_seed(0)
    model = HybridForCausalLM(HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2,
                                           num_key_value_heads=1, **SECTIONS))
    with torch.no_grad():  # larger projections than the default init: errors are not hidden by flat logits
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.25)
    return model


def cases() -> list[tuple[str, list[list[int]] | None]]:
    return [(pattern, documents) for pattern in PATTERNS for documents in (None, PACKED)]


def batch_of(documents, rows: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=generator)
    return {"input_ids": ids, "position_ids": positions(documents, rows), "labels": ids.clone()}


def probe(rows: int, seed: int) -> torch.Tensor:
    """A fixed random weighting of the logits: its sum is the loss whose gradients are compared."""
    return torch.randn(rows, LENGTH, VOCAB, generator=torch.Generator().manual_seed(seed + 1))


def run(model: HybridForCausalLM, batch: dict, weights: torch.Tensor, shard=None) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], context_shard=shard,
                   use_cache=False).logits
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def worker(rank: int, world: int, cp: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world // cp, cp), mesh_dim_names=("dp", "cp"))
        context = ContextGroup(cp, mesh.get_local_rank("cp"), mesh.get_group("cp"), mesh.get_local_rank("dp"),
                               world // cp)
        results = {}
        for index, (pattern, documents) in enumerate(cases()):
            model = tiny_model(pattern)
            # every process of a cp group reads its dp slice of the global batch of 2 rows per dp rank
            full = batch_of(documents, 2 * context.dp_size, seed=index)
            rows = slice(2 * context.dp_rank, 2 * context.dp_rank + 2)
            sharded = shard_batch({k: v[rows] for k, v in full.items()}, context)
            shard = sharded["context_shard"]
            tokens = slice(shard.start, shard.stop)
            weights = probe(2 * context.dp_size, index)[rows, tokens]
            logits, grads = run(model, sharded, weights, shard)
            for grad in grads.values():  # the row's gradient: the sum over shards and over dp ranks
                dist.all_reduce(grad)
            results[index] = (rows, tokens, logits, grads)
        torch.save(results, f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-12))


@pytest.mark.parametrize("world, cp", [(2, 2), (4, 4), (4, 2)], ids=["cp2", "cp4", "dp2xcp2"])
def test_split_rows_match_one_process(world, cp, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(world, cp, free_port(), str(tmp_path)), nprocs=world, start_method="spawn")
    shards = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(world)]
    dp = world // cp
    for index, (pattern, documents) in enumerate(cases()):
        batch = batch_of(documents, 2 * dp, seed=index)
        expected_logits, expected_grads = run(tiny_model(pattern), batch, probe(2 * dp, index))
        logits = torch.zeros_like(expected_logits)
        for rows, tokens, shard_logits, _ in (results[index] for results in shards):
            logits[rows, tokens] = shard_logits
        name = f"{pattern} {'packed' if documents else 'one document'}"
        assert relative_error(logits, expected_logits) < 1e-5, name
        grads = shards[0][index][3]
        assert grads.keys() == expected_grads.keys()
        for key, expected in expected_grads.items():
            assert relative_error(grads[key], expected) < 1e-5, f"{name}: {key}"


@pytest.mark.parametrize("pattern, letter", [("MT", "T"), ("AL", "L")])
def test_titans_and_lact_are_refused(pattern, letter):
    config = HybridConfig(pattern=pattern, vocab_size=VOCAB, hidden_size=32, num_attention_heads=2)
    with pytest.raises(UserError, match=f"`{letter}` .* does not run context-parallel"):
        check_context_parallel(2, 64, config)


def test_shards_too_short_or_uneven_are_refused():
    config = HybridConfig(pattern="MS", vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, **SECTIONS)
    with pytest.raises(UserError, match="does not divide data.seq_len 30"):
        check_context_parallel(4, 30, config)
    with pytest.raises(UserError, match="attention.window - 1 = 4 tokens from the previous shard"):
        check_context_parallel(4, 12, config)
