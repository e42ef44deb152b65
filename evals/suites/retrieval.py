"""passkey and niah: generate a prompt per job at an exact token budget, decode greedily, score with string_match_all.

passkey: lengths x depths grid, `limit` samples per cell, max_new_tokens 16 by default. Score = accuracy over all
samples; by_length, by_depth and the grid (heatmap).
niah: each RULER task at each length, `limit` samples (random needle depths), max_new_tokens 64 by default, plus the
classic grid (niah_grid: one needle at each depth, `limit` per cell). Score = mean over the RULER tasks of their
mean string_match_all (RULER's average); by_length likewise; by_task per task; grid for niah_grid.
The prompt budget is length - max_new_tokens, so prompt and answer fit in `length`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lctk.evals import plots
from lctk.evals.models import generate
from lctk.evals.scoring import string_match_all
from lctk.evals.suites.base import EvalContext, Job, Suite, by, mean
from lctk.evals.tasks import niah, passkey
from lctk.evals.tasks.sample import Sample, sample_rng


class RetrievalSuite(Suite):
    batched = True
    default_new_tokens = 16

    def reserve(self, ctx: EvalContext) -> int:
        return ctx.max_new_tokens or self.default_new_tokens

    def key(self, ctx: EvalContext, job: Job) -> str:
        return job.key(ctx, reserve=self.reserve(ctx))

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        raise NotImplementedError

    def check(self, ctx: EvalContext) -> None:
        """The first prompt of every task and depth must fit the shortest length (PromptTooShort otherwise)."""
        for job in self.jobs(replace(ctx, lengths=[min(ctx.lengths)], limit=1)):
            self.make(ctx, job)

    def run(self, ctx: EvalContext, jobs: list[Job]) -> list[dict]:
        started = time.perf_counter()
        samples = [self.make(ctx, job) for job in jobs]
        generated = time.perf_counter()
        predictions = generate(ctx.model, ctx.tokenizer, [s.input_ids for s in samples], self.reserve(ctx))
        seconds = (time.perf_counter() - generated) / len(jobs)
        records = []
        for job, sample, prediction in zip(jobs, samples, predictions, strict=True):
            score = string_match_all(prediction, sample.answers)
            records.append(
                {
                    "suite": self.name,
                    "task": job.task,
                    "length": job.length,
                    "depth": job.depth,
                    "index": job.index,
                    "seed": ctx.seed,
                    "prompt_hash": hashlib.sha256(sample.prompt.encode()).hexdigest()[:16],
                    "prompt_tokens": len(sample.input_ids),
                    "reserve": sample.reserve,
                    "answer": list(sample.answers),
                    "prediction": prediction,
                    "score": score,
                    "correct": score == 100.0,
                    "sample_seconds": round((generated - started) / len(jobs), 4),
                    "generate_seconds": round(seconds, 4),
                }
            )
        return records


class PasskeySuite(RetrievalSuite):
    name = "passkey"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        return [
            Job(self.name, "passkey", length, index, depth)
            for length in ctx.lengths
            for depth in ctx.depths
            for index in range(ctx.limit)
        ]

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        rng = sample_rng(job.task, job.length, job.depth, job.index, ctx.seed)
        return passkey.make_sample(ctx.tokenizer, job.length, job.depth, rng, reserve=self.reserve(ctx), exact=ctx.exact)

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        return {
            "score": mean(r["score"] for r in records),
            "by_length": by(records, "length"),
            "by_depth": by(records, "depth"),
            "grid": _grid(records),
            "samples": len(records),
        }

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        plots.heatmap(summary["grid"], out_dir / "passkey_heatmap.png", "passkey accuracy (%)", "accuracy (%)")
        return ["passkey_heatmap.png"]


class NiahSuite(RetrievalSuite):
    name = "niah"
    default_new_tokens = 64

    def tasks(self, ctx: EvalContext) -> list[str]:
        return ctx.tasks.get(self.name) or list(niah.TASKS)

    def jobs(self, ctx: EvalContext) -> list[Job]:
        jobs = []
        for task in self.tasks(ctx):
            depths: list[float | None] = list(ctx.depths) if task == "niah_grid" else [None]
            jobs += [
                Job(self.name, task, length, index, depth)
                for length in ctx.lengths
                for depth in depths
                for index in range(ctx.limit)
            ]
        return jobs

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        rng = sample_rng(job.task, job.length, job.depth, job.index, ctx.seed)
        return niah.make_sample(
            ctx.tokenizer, job.task, job.length, rng, depth=job.depth, reserve=self.reserve(ctx), exact=ctx.exact
        )

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        ruler = [r for r in records if r["task"] != "niah_grid"]
        per_task = {
            task: {"score": mean(r["score"] for r in group), "by_length": by(group, "length")}
            for task, group in _group(records, lambda r: r["task"]).items()
        }
        ruler_tasks = [t for t in per_task if t != "niah_grid"]
        by_length = {
            length: mean(per_task[t]["by_length"][length] for t in ruler_tasks if length in per_task[t]["by_length"])
            for length in by(ruler, "length")
        }
        summary = {
            "score": mean(per_task[t]["score"] for t in ruler_tasks),
            "by_length": by_length,
            "by_task": per_task,
            "samples": len(records),
        }
        grid_records = [r for r in records if r["task"] == "niah_grid"]
        if grid_records:
            summary["grid"] = _grid(grid_records)
            if not ruler_tasks:  # only the classic grid was asked for: it is the main figure
                summary["score"], summary["by_length"] = per_task["niah_grid"]["score"], per_task["niah_grid"]["by_length"]
        return summary

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        files = []
        series = {
            task: {int(k): v for k, v in entry["by_length"].items()}
            for task, entry in summary["by_task"].items()
            if task != "niah_grid"
        }
        if series:
            plots.lines(series, out_dir / "niah_by_length.png", "NIAH (RULER tasks)", "context length (tokens)",
                        "string_match_all (%)", logx=True, percent=True)
            files.append("niah_by_length.png")
        if "grid" in summary:
            plots.heatmap(summary["grid"], out_dir / "niah_grid_heatmap.png", "NIAH depth x length (%)")
            files.append("niah_grid_heatmap.png")
        return files


def _group(records: list[dict], key: Callable[[dict], object]) -> dict:
    groups: dict = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def _grid(records: list[dict]) -> dict[str, dict[str, float]]:
    """{length: {depth: mean score}}."""
    return {
        str(length): by(group, "depth")
        for length, group in sorted(_group(records, lambda r: r["length"]).items())
    }
