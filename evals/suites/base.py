"""What every suite shares: the run context, the unit of work (a Job, keyed for resume) and the Suite interface.

A suite lists its jobs, runs a batch of them into records (one JSON line each in samples.jsonl), and summarises all
records (new and resumed) into its results entry: {"score": main figure, "by_length": {"<length>": figure}, ...}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lctk.evals.settings import EvalSettings


@dataclass
class EvalContext:
    """What a suite reads: the run's settings, the model and tokenizer, and facts derived from them."""

    settings: EvalSettings
    model: object = None
    tokenizer: object = None
    model_name: str = "model"  # for people: report titles, records
    model_id: str = ""  # for resume keys: evals.fingerprints.weights_fingerprint of the model
    tokenizer_id: str = ""  # lctk.tasks.tokens.fingerprint of the tokenizer
    train_length: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class Job:
    suite: str
    task: str
    length: int
    index: int
    depth: float | None = None

    def key(self, ctx: EvalContext, **extra: object) -> str:
        """What decides a record: the job, seed, tokenizer and model weights (and suite options); resume skips equal
        keys. The model enters by its fingerprint, never by its name or path: a changed model at the same path runs
        anew."""
        parts = [self.suite, self.task, self.length, self.index, self.depth, ctx.settings.seed, ctx.tokenizer_id, ctx.model_id]
        parts.append(sorted(extra.items()))
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


class Suite:
    name: str = ""
    batched: bool = False  # whether run() takes several jobs at once (rows of one batch, see evals.batching)

    def jobs(self, ctx: EvalContext) -> list[Job]:
        raise NotImplementedError

    def key(self, ctx: EvalContext, job: Job) -> str:
        return job.key(ctx)

    def check(self, ctx: EvalContext) -> None:
        """Raise UserError for settings this suite cannot run with (ctx has the tokenizer, not yet the model), so a
        run fails before its first sample rather than in the middle."""

    def batch_key(self, ctx: EvalContext, job: Job) -> tuple:
        """Jobs that may share a batch have equal keys (sorted ascending: shorter lengths first)."""
        return (job.length,)

    def prepare(self, ctx: EvalContext, job: Job) -> object:
        """The per-sample work that needs no model (prompt building, tokenising). The runner calls it in a thread, a
        batch ahead, so that it overlaps the model's work on the batch before."""
        return None

    def run(self, ctx: EvalContext, jobs: list[Job], prepared: list) -> list[dict]:
        """Records for `jobs`, one each; `prepared` holds prepare()'s result for each job."""
        raise NotImplementedError

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        raise NotImplementedError

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        """Write PNGs into out_dir; return their file names."""
        return []


def mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def by(records: list[dict], field_name: str, value: str = "score") -> dict[str, float]:
    """Mean of records[value] grouped by records[field_name], keys as strings in ascending numeric order."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record[field_name], []).append(record[value])
    return {str(k): mean(v) for k, v in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}
