"""The training loop, on accelerate: one process on CPU or GPU, or `accelerate launch` (DDP, or FSDP from an
accelerate config file) with no code change.

The Trainer is generic: it takes a model, `batches` (step -> this process's micro-batches for that optimizer step,
e.g. lctk.data.packing.StepBatches) and a loss function (model, micro-batch) -> SUM of the per-target losses. The
default is next-token cross-entropy; distillation passes a KD loss, context extension passes batches whose length
changes with the step.

Loss normalisation: every step's gradient is that of the mean loss over all targets of the global batch (all
micro-batches of all processes), counted before the backward passes by `count_fn` (labels != IGNORE after the shift).
Each process backpropagates loss_sum * world_size / global_count, DDP averages over processes, so one process with
batch 2B and two with batch B compute the same gradient. With context parallelism (train.context_parallel = N, see
lctk.parallel.context) the N processes of a group read the same rows and each keeps its shard of them: every target
is counted once, on the process holding its position, and DDP's average over the world sums the shards' gradients
into each row's. A step whose global loss or gradient norm is not finite is
skipped (no update) and counted; max_bad_steps of them in a row (or a run whose every step was skipped) stop the run
with a UserError. The weights then are those the first bad step saw, which an update with a finite loss broke, so they
are not saved: checkpoints holding them are renamed `diverged-step-N` and the message names the last checkpoint whose
next step was finite, which `--resume auto` continues from. Checkpoints are not written during a streak of skipped
steps, and older ones are rotated out only once a newer one's weights gave a finite step.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lctk.errors import UserError
from lctk.labels import IGNORE
from lctk.parallel import ContextGroup, context_group, describe_parallelism, shard_batch, unsharded_model
from lctk.train.checkpoint import (
    check_matches,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    problem_with,
    remove_unfinished,
    rotate,
    save_checkpoint,
    set_aside,
    step_of,
    trainer_state,
    usable_checkpoint,
)
from lctk.train.losses import LMHead, cross_entropy_sum, final_hidden
from lctk.train.optim import lr_factor, make_optimizer
from lctk.train.progress import Reporter, Throughput, format_count
from lctk.train.tracking import start_trackers

Batch = dict[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Summed next-token cross-entropy over the targets (labels != IGNORE; labels are not shifted), from the final
    hidden states chunk by chunk (lctk.train.losses): no [T, vocab] logits. A shard of split rows
    (lctk.parallel.shard_batch) brings `targets`, already shifted, and its `context_shard`."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "context_shard" in batch:
        inputs["context_shard"] = batch["context_shard"]
    hidden, _ = final_hidden(model, inputs)
    if "targets" in batch:
        return cross_entropy_sum(hidden, LMHead.of(model), batch["targets"], shifted=True)
    return cross_entropy_sum(hidden, LMHead.of(model), batch["labels"])


def count_targets(batch: Batch) -> int:
    targets = batch["targets"] if "targets" in batch else batch["labels"][:, 1:]
    return int((targets != IGNORE).sum())


@dataclass
class TrainerState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    wandb_id: str | None = None
    world_size: int = 1  # the data each step reads depends on it, so a run resumes with as many processes
    context_parallel: int = 1  # and on how they split into data-parallel groups (train.context_parallel)


@dataclass
class TrainResult:
    steps: int
    new_steps: int  # trained by this call (0 when resuming a finished run)
    tokens_seen: int
    new_tokens: int
    skipped_steps: int
    final_loss: float | None
    seconds: float
    resumed_from: str | None


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        batches: Callable[[int], list[Batch]],
        *,
        train,
        checkpoint,
        logging,
        run_dir: Path,
        accelerator,
        total_steps: int,
        loss_fn: LossFn = causal_lm_loss,
        count_fn: Callable[[Batch], int] = count_targets,
        run_config: dict | None = None,
        run_name: str = "run",
        context: ContextGroup | None = None,
    ):
        self.accelerator = accelerator
        # the processes that split each row (train.context_parallel); `batches` must then read the rows of this
        # process's data-parallel rank (ContextGroup.dp_rank of dp_size)
        self.context = context or context_group(accelerator, train.context_parallel)
        self.train, self.checkpoint, self.logging = train, checkpoint, logging
        self.run_dir, self.checkpoint_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.batches, self.loss_fn, self.count_fn = batches, loss_fn, count_fn
        self.total_steps = total_steps
        self.unconfirmed: Path | None = None  # the newest checkpoint, until its weights give a finite step
        self.run_config, self.run_name = run_config, run_name
        if train.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if train.recompute_segment is not None:
            if not hasattr(model, "recompute_in_segments"):
                raise UserError(f"train.recompute_segment: needs an lctk hybrid model, not {type(model).__name__}")
            model.recompute_in_segments(train.recompute_segment)
        optimizer = make_optimizer(model, train)
        self.plain_class = type(model)  # FSDP2 swaps the class in prepare(); trained_model() rebuilds the plain one
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if train.compile:
            self.model.compile()  # in place: parameter names, and so checkpoints, stay those of the plain model
        self.state = TrainerState(world_size=accelerator.num_processes, context_parallel=self.context.size)

    def fit(self, resume: str | None = None) -> TrainResult:
        """Train to total_steps. resume: None (fresh), "auto" (the latest valid checkpoint, if any) or a path."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            remove_unfinished(self.checkpoint_dir)  # what a killed save left (the run holds its folder)
        resumed_from = self._resume(resume)
        self.state.wandb_id = start_trackers(accelerator, self.logging, self.run_dir, self.run_name, self.run_config or {},
                                             self.state.wandb_id)
        reporter = Reporter(self.run_dir, self.total_steps, self.state.step, enabled=accelerator.is_main_process,
                            accelerator=accelerator)
        if accelerator.num_processes > 1:
            reporter.message(describe_parallelism(accelerator, self.model))
        if resumed_from:
            reporter.message(f"resumed from {resumed_from} at step {self.state.step}")
        started, throughput = time.perf_counter(), Throughput()
        first_step, first_tokens = self.state.step, self.state.tokens_seen
        interval_losses: list[float] = []
        last_loss = None
        self.model.train()
        try:
            while self.state.step < self.total_steps:
                loss, grad_norm, tokens = self._step(self.state.step)
                if self.state.bad_in_a_row == 0:
                    self._confirm()
                self.state.step += 1
                self.state.tokens_seen += tokens
                throughput.add(tokens)
                if loss is not None:
                    interval_losses.append(loss)
                    last_loss = loss
                done = self.state.step == self.total_steps
                if self.state.step % self.logging.every == 0 or done:
                    reporter.log(self._metrics(interval_losses, grad_norm, throughput.read()))
                    interval_losses = []
                every_step_skipped = done and self.state.bad_in_a_row == self.state.step - first_step
                if self.state.bad_in_a_row >= self.train.max_bad_steps or every_step_skipped:
                    self._stop_diverged()
                periodic = self.checkpoint.every and self.state.step % self.checkpoint.every == 0
                if done or (periodic and self.state.bad_in_a_row == 0):
                    self.unconfirmed = self._save()
                    if done and self.state.bad_in_a_row == 0:
                        self._confirm()
        finally:
            reporter.close()
        return TrainResult(
            steps=self.state.step,
            new_steps=self.state.step - first_step,
            tokens_seen=self.state.tokens_seen,
            new_tokens=self.state.tokens_seen - first_tokens,
            skipped_steps=self.state.skipped_steps,
            final_loss=last_loss,
            seconds=time.perf_counter() - started,
            resumed_from=resumed_from,
        )

    def _step(self, step: int) -> tuple[float | None, float | None, int]:
        """One optimizer step; returns (global mean loss or None if not finite, grad norm, global tokens)."""
        accelerator = self.accelerator
        micro_batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in self.batches(step)]
        if self.context.size > 1:
            micro_batches = [shard_batch(b, self.context) for b in micro_batches]
        local = torch.tensor([sum(self.count_fn(b) for b in micro_batches), sum(b["input_ids"].numel() for b in micro_batches)],
                             dtype=torch.float64, device=accelerator.device)
        targets, tokens = accelerator.reduce(local, reduction="sum").tolist()
        scale = accelerator.num_processes / max(targets, 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = self.train.lr * lr_factor(step, self.total_steps, self.train)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model), accelerator.autocast():
                loss = self.loss_fn(self.model, batch)
                accelerator.backward(loss * scale)
            loss_sum += loss.detach().double()
        mean_loss = float(accelerator.reduce(loss_sum, reduction="sum")) / max(targets, 1.0)
        grad_norm = float(accelerator.clip_grad_norm_(self.model.parameters(), self.train.clip or math.inf))
        if math.isfinite(mean_loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.state.bad_in_a_row = 0
        else:
            self.state.skipped_steps += 1
            self.state.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        return (mean_loss if math.isfinite(mean_loss) else None), (grad_norm if math.isfinite(grad_norm) else None), int(tokens)

    def trained_model(self) -> nn.Module:
        """The model without accelerate's wrappers (autocast included: evaluate it as from_pretrained will load it),
        with full weights on every process. Collective under FSDP: every process must call it."""
        model = unsharded_model(self.accelerator, self.model, self.plain_class)
        self.accelerator.free_memory()  # accelerate keeps every prepared model and optimizer otherwise
        return model

    def _metrics(self, losses: list[float], grad_norm: float | None, tokens_per_s: float) -> dict:
        step = self.state.step
        return {
            "step": step,
            "loss": sum(losses) / len(losses) if losses else None,
            "lr": self.train.lr * lr_factor(step - 1, self.total_steps, self.train),
            "grad_norm": grad_norm,
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_seen": self.state.tokens_seen,
            "peak_memory_mb": round(peak_memory_mb(self.accelerator.device), 1),
            "skipped_steps": self.state.skipped_steps,
            "time": round(time.time(), 3),
        }

    def _save(self) -> Path:
        return save_checkpoint(
            self.accelerator, self.checkpoint_dir, self.state.step, self.model, self.optimizer, asdict(self.state)
        )

    def _confirm(self) -> None:
        """The newest checkpoint's weights gave a finite step: the checkpoints it supersedes may go."""
        if self.unconfirmed is not None and self.accelerator.is_main_process:
            rotate(self.checkpoint_dir, self.unconfirmed, self.checkpoint.keep_last)
        self.unconfirmed = None

    def _stop_diverged(self) -> None:
        """Set aside the checkpoints holding the weights of the first bad step and raise, naming the last good one."""
        bad = self.state.bad_in_a_row
        first_bad = self.state.step - bad  # checkpoint N holds the weights that step N + 1 used
        good = None
        for path in list_checkpoints(self.checkpoint_dir):
            if step_of(path) < first_bad and problem_with(path, checksums=False) is None:
                good = path
            elif first_bad <= step_of(path) <= self.state.step and self.accelerator.is_main_process:
                set_aside(path)
        self.accelerator.wait_for_everyone()
        found = (f"the last checkpoint before them is {good} (--resume auto continues from it)" if good
                 else "no checkpoint precedes them, so start again")
        raise UserError(
            f"training stopped at step {self.state.step}: {bad} non-finite losses or gradients in a row from step "
            f"{first_bad + 1}, and the diverged weights were not saved; {found}: {divergence_advice(self.train)}"
        )

    def _resume(self, resume: str | None) -> str | None:
        if resume is None:
            return None
        warn = (lambda text: print(f"warning: {text}", flush=True)) if self.accelerator.is_main_process else (lambda _: None)
        if resume == "auto":
            path = latest_valid(self.checkpoint_dir, warn)
            if path is None:
                if list_checkpoints(self.checkpoint_dir):
                    warn("no usable checkpoint; starting from scratch")
                return None
        else:
            path = usable_checkpoint(Path(resume))
        check_matches(path, self.accelerator.unwrap_model(self.model))
        try:
            saved = trainer_state(path)
            if saved.get("world_size", 1) != self.accelerator.num_processes:
                raise UserError(
                    f"--resume: {path} was written by {saved.get('world_size', 1)} process(es); resume it with as many "
                    f"(this run has {self.accelerator.num_processes})"
                )
            if saved.get("context_parallel", 1) != self.context.size:
                raise UserError(
                    f"train.context_parallel: {path} was written with context_parallel {saved.get('context_parallel', 1)};"
                    f" resume it with the same (this run has {self.context.size}), or the global batch would change"
                )
            load_checkpoint(self.accelerator, path, self.model, self.optimizer)
            self.state = TrainerState(**saved)
        except UserError:
            raise
        except Exception as error:  # its checksums matched: files another run or lctk version wrote, not damage
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(f"--resume: checkpoint {path} cannot be restored into this run ({reason})") from None
        return str(path)


def divergence_advice(train) -> str:
    """What to change in the train section a run diverged with: only settings it does not have already."""
    changes = [f"a lower train.lr (it is {train.lr:g}; try {train.lr / 4:g})"]
    if train.precision != "fp32":
        changes.append(f"train.precision: fp32 (it is {train.precision})")
    if train.clip is None:
        changes.append("train.clip: 1.0 (gradient clipping is off)")
    if train.warmup_steps == 0:
        changes.append("train.warmup_steps of a few percent of the steps (there is no warm-up)")
    listed = ", ".join(changes[:-1]) + f" or {changes[-1]}" if len(changes) > 1 else changes[0]
    return f"try {listed}; if it still diverges, check the model settings"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


@torch.no_grad()
def held_out_loss(model: nn.Module, rows: list, accelerator, batch_size: int = 8) -> float | None:
    """Mean next-token loss over packed held-out rows (lctk.data.packing.Row), on this process."""
    from lctk.data.packing import collate

    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(rows[start : start + batch_size]).items()}
        with accelerator.autocast():
            total += float(causal_lm_loss(model, batch))
        count += count_targets(batch)
    model.train(was_training)
    return total / max(count, 1)


def summary_line(result: TrainResult, run_dir: Path) -> str:
    rate = result.new_tokens / max(result.seconds, 1e-9)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    return (
        f"done: {result.steps} steps, {format_count(result.tokens_seen)} tokens, {result.seconds:.1f}s "
        f"({format_count(rate)} tok/s), final loss {loss}, {result.skipped_steps} skipped steps -> {run_dir}"
    )
