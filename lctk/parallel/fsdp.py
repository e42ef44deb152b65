"""FSDP2 through accelerate, the same on GPUs and on CPU processes.

`accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP and the FSDP_* settings in
each process's environment. On GPUs accelerate then shards the model in `prepare()`; on CPU processes (gloo) it
silently falls back to DDP, since it only enables FSDP for accelerator devices, although torch's `fully_shard` runs
on CPU. `make_accelerator` switches such a CPU run to FSDP too, so the CPU launch configs test the real thing, and keeps
FSDP on for every later prepare() of a staged run (distill, extend).

Only FSDP2 (`fsdp_version: 2`) is supported: it shards parameters as DTensors per block, which is what the
checkpoint code (torch.distributed.checkpoint's full state dict helpers) and `unsharded_model` expect.
With bf16 the policy keeps fp32 master weights, computes in bf16 and reduces gradients in fp32 (accelerate's default
reduces in bf16, which loses low bits of small gradients summed over many ranks).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lctk.errors import UserError


def fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(train):
    """One Accelerator per process: one process on CPU or GPU, DDP or FSDP2 from an accelerate config, on GPUs or on
    CPU processes over gloo (which accelerate only does when told `cpu=True`)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    bf16 = train.precision == "bf16"
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    launched_on_cpu = launched and not torch.cuda.is_available()
    plugin = None
    if fsdp_requested() and launched:  # one process has nothing to shard with
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(f"fsdp_version: {version} in the accelerate config; lctk supports FSDP2 (fsdp_version: 2)")
        policy = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.bfloat16}
        plugin = FullyShardedDataParallelPlugin(mixed_precision_policy=policy if bf16 else None)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=launched_on_cpu, fsdp_plugin=plugin)
    if plugin is not None:
        # accelerate enables FSDP only for accelerator devices and only in AcceleratorState, which copies PartialState's
        # type back whenever it is created again (the next prepare() of a staged run then wrapped with DDP): set both
        for state in (PartialState(), accelerator.state):
            state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def describe_parallelism(accelerator, model: nn.Module) -> str:
    """One line saying how the work is split, e.g. 'FSDP2 over 2 processes: this process holds 50.3% of 1.2M
    parameters' (what a user checks to see that a config really shards)."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_sharded(unwrapped):
        return f"DDP over {accelerator.num_processes} processes: the full model on each"
    local = sum(getattr(p, "_local_tensor", p).numel() for p in unwrapped.parameters())
    total = sum(p.numel() for p in unwrapped.parameters())
    return (f"FSDP2 over {accelerator.num_processes} processes: this process holds {100 * local / total:.1f}% of "
            f"{total / 1e6:.2f}M parameters")


def unsharded_model(accelerator, model: nn.Module, plain_class: type[nn.Module]) -> nn.Module:
    """The prepared `model` as a plain module with its full weights, on every process. Collective under FSDP: every
    process must call it. `plain_class` is the model's class before prepare() (FSDP2 swaps in a subclass)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if not is_sharded(unwrapped):
        return unwrapped
    state = get_model_state_dict(unwrapped, options=StateDictOptions(full_state_dict=True))  # all-gather
    plain = plain_class(unwrapped.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {name for name, _ in plain.named_parameters(remove_duplicate=False)} - set(state)
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered weights do not fit {plain_class.__name__}: {missing or unexpected}")
    return plain.to(accelerator.device)
