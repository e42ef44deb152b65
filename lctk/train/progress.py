"""What a run reports while it trains: metrics.jsonl (always), a rich progress bar on a terminal or plain step lines
otherwise, and the experiment trackers the command started on the accelerator (wandb, TensorBoard, ...:
lctk.train.tracking). Only the main process reports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lctk.train.tracking import set_steps_logged, steps_logged


def format_count(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def step_line(metrics: dict, total_steps: int) -> str:
    """One line per logged step: step, loss, lr, grad norm, tokens/s, tokens seen, peak memory, skipped steps."""
    parts = [
        f"step {metrics['step']}/{total_steps}",
        f"loss {metrics['loss']:.4f}" if metrics.get("loss") is not None else "loss nan",
        f"lr {metrics['lr']:.2e}",
        f"grad {metrics['grad_norm']:.3f}" if metrics.get("grad_norm") is not None else "grad nan",
        f"{format_count(metrics['tokens_per_s'])} tok/s",
        f"{format_count(metrics['tokens_seen'])} tokens",
        f"mem {metrics['peak_memory_mb'] / 1024:.2f} GiB",
    ]
    if metrics.get("skipped_steps"):
        parts.append(f"skipped {metrics['skipped_steps']}")
    return " | ".join(parts)


class Reporter:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, accelerator=None):
        """accelerator: log to its trackers too, each step after the `steps_logged` of the command's earlier runs."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.metrics_file = run_dir / "metrics.jsonl"
        self.accelerator = accelerator if accelerator is not None and accelerator.trackers else None
        self.first_tracker_step = steps_logged(accelerator) if self.accelerator is not None else 0
        self.bar: Progress | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_after(self.metrics_file, start_step)  # lines a killed run logged after its last checkpoint
        if sys.stdout.isatty():
            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                refresh_per_second=4,
            )
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")
            self.bar.start()

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.accelerator is not None:
            values = {f"train/{k}": v for k, v in metrics.items() if k != "step" and v is not None}
            self.accelerator.log(values, step=self.first_tracker_step + metrics["step"])
        if self.bar is not None:
            loss = metrics.get("loss")
            status = f"loss {loss:.4f}" if loss is not None else "loss nan"
            status += f" | lr {metrics['lr']:.2e} | {format_count(metrics['tokens_per_s'])} tok/s"
            self.bar.update(self.task, completed=metrics["step"], status=status)
        else:
            print(step_line(metrics, self.total_steps), flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.console.print if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.accelerator is not None:  # the trackers stay open for the command's evals (end_training closes them)
            set_steps_logged(self.accelerator, self.first_tracker_step + self.total_steps)


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill, or bytes that are not text
        at = record.get("step", 0) if isinstance(record, dict) else None
        if isinstance(at, int) and at <= step:
            kept.append(line.decode())
    path.write_text("".join(f"{line}\n" for line in kept))


class Throughput:
    """Tokens per second over the interval since the last reading."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate
