"""Context parallelism: every training row split into N contiguous shards over the N processes of a group.

Layout. Rank r of a group of N holds tokens [r T/N, (r+1) T/N) of every row. Contiguous shards make every recurrent
exchange one hop (`from_previous`: a convolution's last K-1 inputs, a sliding window's last window-1 keys) or one
small scan (`carry_ssd_states`: the SSD state, O(H K V) bytes per layer, whatever T is). The price is attention's
causal load: rank r's queries see (r+1) T/N keys, so it does about (2r+1)/N^2 of the work and the last rank sets the
pace. A load-balanced "zigzag" layout (rank r holding shards r and 2N-1-r of 2N) would fix that for `A` but turn
every recurrent hop into a two-way exchange; it would be a change of `ContextShard` (which tokens it holds: `start`,
`stop`, `continues`, `documents`) and of attention's key gather, nothing else, since the mixers only ask the shard.

Collectives (all with autograd, on gloo and NCCL; they use the group's own communicator, never the world's, so DDP's
and FSDP's collectives cannot interleave with them):
- `from_previous(x)`: rank r receives rank r-1's x (rank 0 gets zeros); backward sends the gradient back.
- `all_gather(x)`: [N, *x.shape], every rank's x; backward all-reduces the gradient and keeps the rank's slice.
Every call adds the bytes this process sends (forward and backward) to `BYTES_SENT[tag]`, which the benchmark reads.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lctk.errors import UserError
from lctk.labels import shifted_targets
from lctk.models.layers import conv_tail
from lctk.models.sequence import document_index, runs_of

BYTES_SENT: Counter[str] = Counter()  # tag (e.g. "A kv", "M state") -> bytes this process sent


@dataclass
class ContextGroup:
    """Where this process sits in world = dp x cp: its context-parallel group (one row of the (dp, cp) mesh, the
    processes that share each training row) and its data-parallel coordinates (which rows it reads)."""

    size: int  # N, processes per row
    rank: int  # this process's shard of every row
    group: dist.ProcessGroup | None  # None when size is 1
    dp_rank: int
    dp_size: int


def context_group(accelerator, size: int) -> ContextGroup:
    """The context-parallel group of `size` processes this process belongs to, from a (dp, cp) DeviceMesh over the
    already initialised world. Collective: every process calls it."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if world % size:
        raise UserError(f"train.context_parallel: {size} does not divide the number of processes {world}")
    if size == 1:
        return ContextGroup(1, 0, None, rank, world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(accelerator.device.type, (world // size, size), mesh_dim_names=("dp", "cp"))
    return ContextGroup(size, mesh.get_local_rank("cp"), mesh.get_group("cp"), mesh.get_local_rank("dp"), world // size)


def check_context_parallel(size: int, seq_len: int, config) -> None:
    """One UserError line for a split the model cannot take: seq_len not divisible, a mixer that does not run split,
    or shards shorter than what a mixer takes from the previous one."""
    if size == 1:
        return
    from lctk.models.mixers import MIXERS

    if not hasattr(config, "pattern"):
        raise UserError(f"train.context_parallel: splits rows of lctk hybrid models only, not {config.model_type}")
    if seq_len % size:
        raise UserError(f"train.context_parallel: {size} does not divide data.seq_len {seq_len}")
    for letter in dict.fromkeys(config.pattern):
        problem = MIXERS[letter].context_parallel_problem(config, seq_len // size)
        if problem:
            raise UserError(f"train.context_parallel: {problem}")


@dataclass
class ContextShard:
    """This process's shard of a batch of rows, what mixers ask through `SequenceInfo.shard`. A zigzag layout would
    change `start`/`stop` (two ranges), `continues` and `previous_visible`, and attention's key gather."""

    group: dist.ProcessGroup
    rank: int
    size: int
    start: int  # the shard is tokens [start, stop) of every row
    stop: int
    continues: Tensor  # [B] bool: the shard's first token continues the document of the previous shard's last token
    documents: Tensor | None  # [B, T] document index of every token of the full rows; None: one document per row

    @functools.cached_property
    def document_runs(self) -> list[list[tuple[int, int]]]:
        """Per row, the (start, end) of each document among the tokens up to this shard's end: attention's spans
        (computed once per forward, for every attention layer)."""
        return runs_of(self.documents[:, : self.stop])

    def all_gather(self, x: Tensor, tag: str) -> Tensor:
        return _AllGather.apply(x, self, tag)

    def from_previous(self, x: Tensor, tag: str) -> Tensor:
        return _FromPrevious.apply(x, self, tag)

    def previous_visible(self, count: int) -> Tensor:
        """[B, count] bool: which of the `count` tokens before the shard belong to its first token's document."""
        batch = self.continues.shape[0]
        visible = self.continues[:, None].expand(batch, count)
        if self.documents is not None and self.rank > 0:
            before = self.documents[:, self.start - count : self.start]
            visible = visible & (before == self.documents[:, self.start, None])
        return visible

    def conv_halo(self, x: Tensor, kernel: int, seq_idx: Tensor | None, tag: str) -> Tensor:
        """The previous shard's last K-1 convolution inputs [B, K-1, D] (zeros where they belong to another document
        than this shard's first token), the `past` of a causal convolution over this shard's x [B, T_shard, D]."""
        # the sender zeroes inputs of its earlier documents; the receiver drops all when it starts a new document
        halo = self.from_previous(conv_tail(x, None, kernel, seq_idx), tag)
        return halo * self.continues[:, None, None].to(halo.dtype)

    def carry_ssd_states(self, out: Tensor, q: Tensor, g: Tensor | None, final: Tensor, seq_idx: Tensor | None,
                         tag: str) -> Tensor:
        """Exact SSD outputs of the shard from those of a zero initial state.

        out [B, T, H, V]: o_t with S = 0 at the shard start; q [B, T, Hk, K]; g [B, T, H] log-decay or None (no
        decay); final [B, H, K, V]: the state at the shard's end from S = 0 at its start (of its last document);
        seq_idx [B, T]: local documents. Each rank's state passes through the next whole shard as
            S_end(r) = F_r + a_r S_end(r-1),  a_r = exp(sum_{t in r} g_t) if shard r is one document continuing the
            previous shard's, else 0,
        so the all-gather of (F, a) and a scan over the earlier ranks give the incoming state S_in; the shard's first
        document then gets o_t += q_t^T exp(G_t) S_in with G_t = sum_{s<=t} g_s from the shard start. Sends
        O(H K V) bytes per rank, independent of T; backward by autograd (the gather's backward reaches the ranks that
        produced each F and a)."""
        batch, length, heads = out.shape[:3]
        if g is None:
            log_decay = out.new_zeros(batch, length, heads, dtype=torch.float32)
        else:
            log_decay = g.float().cumsum(1)  # [B, T, H]: G_t
        first_doc = (
            torch.ones(batch, length, dtype=torch.bool, device=out.device) if seq_idx is None else seq_idx == 0
        )
        through = torch.exp(log_decay[:, -1]) * (self.continues & first_doc[:, -1])[:, None]  # a_r [B, H]
        packed = torch.cat([final.float().flatten(1), through], dim=1)  # one collective per layer
        gathered = self.all_gather(packed, tag)  # [N, B, H K V + H]
        finals = gathered[:, :, : final[0].numel()].view(self.size, *final.shape)
        throughs = gathered[:, :, final[0].numel() :]
        # sum_{j<r} (prod_{j<i<r} a_i) F_j as weights over all N ranks, so that every rank's graph holds the gather
        # (its backward all-reduce is collective)
        weights = torch.stack([throughs[j + 1 : self.rank].prod(0) if j < self.rank else torch.zeros_like(through)
                               for j in range(self.size)])  # [N, B, H]
        incoming = torch.einsum("nbh,nbhkv->bhkv", weights, finals)
        mask = (first_doc & self.continues[:, None]).unsqueeze(-1)  # [B, T, 1]
        q_heads = q.float().repeat_interleave(heads // q.shape[2], dim=2)
        carried = torch.einsum("bthk,bhkv->bthv", q_heads, incoming) * (torch.exp(log_decay) * mask).unsqueeze(-1)
        return out + carried.to(out.dtype)


    def carry_affine_states(self, out: Tensor, readout: Tensor, final: Tensor, transition: Tensor,
                            seq_idx: Tensor | None, tag: str) -> Tensor:
        """Exact outputs of a shard whose recurrence is affine in the state it starts from (the delta rule):
        o_t = out_t + readout_t S_in and S_end = M S_in + F.

        out [B, T, H, V] and final F [B, H, K, V]: from S_in = 0 (F of the shard's last document); readout [B, T, H, K];
        transition M [B, H, K, K] (0 where the shard holds a document start). Each rank's state passes through the next
        whole shard as S_end(r) = M_r S_end(r-1) + F_r, so an all-gather of (F, M) and a scan over the earlier ranks
        give S_in, which the shard's first document reads if it continues the previous shard's. Sends O(H K (K + V))
        bytes per rank, independent of T; backward by autograd through the gather."""
        first_doc = torch.ones_like(out[..., 0, 0], dtype=torch.bool) if seq_idx is None else seq_idx == 0  # [B, T]
        through = transition * (self.continues & first_doc[:, -1])[:, None, None, None]
        packed = torch.cat([final.flatten(1), through.flatten(1)], dim=1)  # one collective per layer
        gathered = self.all_gather(packed, tag)  # [N, B, H K V + H K K]
        finals = gathered[:, :, : final[0].numel()].view(self.size, *final.shape)
        throughs = gathered[:, :, final[0].numel() :].view(self.size, *transition.shape)
        incoming = finals[0] * 0  # from the gather on every rank, rank 0 included (its backward all-reduce is collective)
        for j in range(self.rank):
            incoming = throughs[j] @ incoming + finals[j]
        mask = (first_doc & self.continues[:, None])[..., None, None]  # [B, T, 1, 1]
        carried = torch.einsum("bthk,bhkv->bthv", readout.to(incoming.dtype), incoming) * mask
        return out + carried.to(out.dtype)


def shard_batch(batch: dict[str, Tensor], context: ContextGroup) -> dict:
    """A training micro-batch (input_ids, position_ids, labels of full rows [B, T]) -> this process's shard in a group
    of N > 1: input_ids, position_ids, `targets` (labels shifted on the full rows before the split, so a shard's last
    token predicts the next shard's first) and `context_shard`. Documents restart where a position is 0."""
    positions = batch["position_ids"]
    length = positions.shape[1]
    if length % context.size:
        raise UserError(f"train.context_parallel: {context.size} does not divide the row length {length}")
    per = length // context.size
    start, stop = context.rank * per, (context.rank + 1) * per
    continues = positions[:, start] != 0
    if context.rank == 0:  # a row's first token starts a document whatever its position, as in one process
        continues = torch.zeros_like(continues)
    shard = ContextShard(context.group, context.rank, context.size, start, stop, continues, document_index(positions))
    tokens = slice(start, stop)
    return {
        "input_ids": batch["input_ids"][:, tokens],
        "position_ids": batch["position_ids"][:, tokens],
        "targets": shifted_targets(batch["labels"])[:, tokens],
        "context_shard": shard,
    }


def _count(tag: str, tensor: Tensor, copies: int) -> None:
    BYTES_SENT[tag] += tensor.numel() * tensor.element_size() * copies


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shard: ContextShard, tag: str) -> Tensor:
        ctx.shard, ctx.tag = shard, tag
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x, group=shard.group)
        _count(tag, x, shard.size - 1)  # a ring all-gather sends N-1 pieces of x's size
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shard = ctx.shard
        grad = grad.contiguous()
        dist.all_reduce(grad, group=shard.group)  # every rank's use of this rank's x
        _count(ctx.tag, grad[0], 2 * (shard.size - 1))  # a ring all-reduce sends 2(N-1)/N of the tensor
        return grad[shard.rank], None, None


class _FromPrevious(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, shard: ContextShard, tag: str) -> Tensor:
        ctx.shard, ctx.tag = shard, tag
        return _shift(x.contiguous(), shard, tag, forward=True)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _shift(grad.contiguous(), ctx.shard, ctx.tag, forward=False), None, None


def _shift(x: Tensor, shard: ContextShard, tag: str, forward: bool) -> Tensor:
    """Send x one rank along the group (forward: to r+1; backward: to r-1) and return what arrives (zeros at the
    end with no neighbour)."""
    step = 1 if forward else -1
    to, source = shard.rank + step, shard.rank - step
    received = torch.zeros_like(x)
    requests = []
    if 0 <= to < shard.size:
        requests.append(dist.isend(x, dist.get_global_rank(shard.group, to), group=shard.group))
        _count(tag, x, 1)
    if 0 <= source < shard.size:
        requests.append(dist.irecv(received, dist.get_global_rank(shard.group, source), group=shard.group))
    for request in requests:
        request.wait()
    return received
