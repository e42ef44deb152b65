"""Parallelism past one process, in one place: how accelerate is set up for FSDP (also on CPU processes over gloo)
and how a sharded model is gathered back into a plain one. Mixers and the training loop reach these helpers; they
hold no collectives of their own."""

from lctk.parallel.fsdp import describe_parallelism, is_sharded, make_accelerator, unsharded_model

__all__ = ["describe_parallelism", "is_sharded", "make_accelerator", "unsharded_model"]
