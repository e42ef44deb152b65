"""Parallelism past one process, in one place: how accelerate is set up for FSDP (also on CPU processes over gloo),
how a sharded model is gathered back into a plain one, and context parallelism (rows split across processes,
lctk.parallel.context). Mixers and the training loop reach these helpers; they hold no collectives of their own."""

from lctk.parallel.context import ContextGroup, check_context_parallel, context_group, shard_batch
from lctk.parallel.fsdp import describe_parallelism, is_sharded, make_accelerator, unsharded_model

__all__ = [
    "ContextGroup",
    "check_context_parallel",
    "context_group",
    "describe_parallelism",
    "is_sharded",
    "make_accelerator",
    "shard_batch",
    "unsharded_model",
]
