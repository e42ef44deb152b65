"""passkey, niah and ruler: generate a prompt per job at an exact token budget, decode greedily, score as RULER does.

passkey: lengths x depths grid, `limit` samples per cell, max_new_tokens 16 by default; the task name picks the
variant (passkey: Landmark Attention's prompt, passkey_stuffed_mamba: Stuffed Mamba's), and the report names it.
Score = accuracy over all samples; by_length, by_depth and the grid (heatmap).
niah: each of RULER's 8 NIAH tasks at each length, `limit` samples, 128 tokens reserved (RULER's tokens_to_generate),
plus the classic grid (niah_grid: one needle at each depth, `limit` per cell). Score = mean over the NIAH tasks run
(not RULER's average, which needs all 13 tasks: see ruler); by_length likewise; by_task per task; grid for niah_grid.
ruler: RULER's 13 tasks (the 8 NIAH + vt, cwe, fwe, qa_1, qa_2; tasks.ruler), each with RULER's tokens_to_generate
reserved and its metric (string_match_all, or string_match_part for QA). Score = "RULER average" only when all 13
ran; otherwise None, and `tasks_run` / the report name what ran. Without QA data the QA tasks are left out of
`--suite ruler` with one warning line (asking for qa_1 / qa_2 by name fails instead).
The prompt budget is length - reserve, so prompt and answer fit in `length`. Prompts are wrapped in the tokenizer's
chat template per ctx.settings.chat_template (RULER does this for instruct models). Generation stops at end-of-text, and at
the first newline for tasks whose answer is one line (passkey, single-value NIAH, vt, QA). Samples run in batches of
one length (evals.batching: sized to a memory budget by default), prompts built a batch ahead in a thread;
samples_per_s / tokens_per_s: over the runner's wall time, prefill / decode tokens/s over the model's (throughput()).
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from lctk.errors import UserError
from lctk.evals import plots
from lctk.evals.generation import generate
from lctk.evals.scoring import METRICS
from lctk.evals.suites.base import EvalContext, Job, Suite, by, mean
from lctk.tasks import niah, passkey, ruler
from lctk.tasks.sample import Sample, sample_rng
from lctk.tasks.tokens import chat_wrap

RULER_TASKS = niah.RULER_TASKS + ruler.TASKS


class RetrievalSuite(Suite):
    batched = True
    default_new_tokens = 16

    def reserve(self, ctx: EvalContext, task: str) -> int:
        return ctx.settings.max_new_tokens or self.default_new_tokens

    def one_line(self, task: str) -> bool:
        return True

    def key(self, ctx: EvalContext, job: Job) -> str:
        extra = {"reserve": self.reserve(ctx, job.task), "chat": chat_wrap(ctx.tokenizer, ctx.settings.chat_template)}
        if ctx.settings.haystack:
            extra["haystack"] = ctx.settings.haystack
        return job.key(ctx, **extra)

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        raise NotImplementedError

    def check(self, ctx: EvalContext) -> None:
        """The first prompt of every task and depth must fit the shortest length (PromptTooShort otherwise)."""
        for job in self.jobs(replace(ctx, settings=replace(ctx.settings, lengths=(min(ctx.settings.lengths),), limit=1))):
            reserve = self.reserve(ctx, job.task)
            if reserve >= job.length:  # no prompt at all: say which length and reserve, not "a -N-token prompt"
                raise UserError(f"--lengths: {job.length} tokens leave no room for a {job.task} prompt: {reserve} are "
                                "kept for the answer (raise --lengths or lower --max-new-tokens)")
            self.make(ctx, job)

    def batch_key(self, ctx: EvalContext, job: Job) -> tuple:
        # a batch runs until its longest answer ends (where the cache cannot drop finished rows, every row does)
        return job.length, self.one_line(job.task), self.reserve(ctx, job.task)

    def prepare(self, ctx: EvalContext, job: Job) -> tuple[Sample, float]:
        started = time.perf_counter()
        sample = self.make(ctx, job)
        return sample, time.perf_counter() - started

    def run(self, ctx: EvalContext, jobs: list[Job], prepared: list[tuple[Sample, float]]) -> list[dict]:
        samples = [sample for sample, _ in prepared]
        out = generate(ctx.model, ctx.tokenizer, [s.input_ids for s in samples], [s.reserve for s in samples],
                       one_line=[self.one_line(job.task) for job in jobs])
        rows = len(jobs)
        records = []
        for job, (sample, made_in), prediction, new_tokens in zip(jobs, prepared, out.texts, out.new_tokens, strict=True):
            metric = sample.meta.get("metric", "all")
            score = METRICS[metric](prediction, sample.answers)
            records.append(
                {
                    "suite": self.name,
                    "task": job.task,
                    "length": job.length,
                    "depth": job.depth,
                    "index": job.index,
                    "seed": ctx.settings.seed,
                    "prompt_hash": hashlib.sha256(sample.prompt.encode()).hexdigest()[:16],
                    "prompt_tokens": len(sample.input_ids),
                    "reserve": sample.reserve,
                    "metric": f"string_match_{metric}",
                    "answer": list(sample.answers),
                    "prediction": prediction,
                    "score": score,
                    "correct": score == 100.0,
                    "new_tokens": new_tokens,
                    "batch_rows": rows,
                    # the batch's times shared out per row
                    "sample_seconds": round(made_in, 4),
                    "prefill_seconds": round(out.prefill_seconds / rows, 4),
                    "decode_seconds": round(out.decode_seconds / rows, 4),
                    "cache_bytes": out.cache_bytes // rows,
                }
            )
        return records


class PasskeySuite(RetrievalSuite):
    name = "passkey"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        return [
            Job(self.name, variant, length, index, depth)
            for variant in ctx.settings.tasks.get(self.name) or ["passkey"]
            for length in ctx.settings.lengths
            for depth in ctx.settings.depths
            for index in range(ctx.settings.limit)
        ]

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        rng = sample_rng(job.task, job.length, job.depth, job.index, ctx.settings.seed)
        return passkey.make_sample(ctx.tokenizer, job.length, job.depth, rng, reserve=self.reserve(ctx, job.task),
                                   exact=ctx.settings.exact, variant=job.task, chat=chat_wrap(ctx.tokenizer, ctx.settings.chat_template))

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        variants = sorted({r["task"] for r in records})
        return {
            "variant": ", ".join(f"{v}: {passkey.VARIANTS[v]}" for v in variants),
            **throughput(records),
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
    default_new_tokens = niah.DEFAULT_RESERVE

    def tasks(self, ctx: EvalContext) -> list[str]:
        return ctx.settings.tasks.get(self.name) or list(niah.TASKS)

    def one_line(self, task: str) -> bool:
        spec = niah.TASKS.get(task)
        return spec.values * spec.queries == 1 if spec else task in ruler.ONE_LINE

    def jobs(self, ctx: EvalContext) -> list[Job]:
        jobs = []
        for task in self.tasks(ctx):
            depths: list[float | None] = list(ctx.settings.depths) if task == "niah_grid" else [None]
            jobs += [
                Job(self.name, task, length, index, depth)
                for length in ctx.settings.lengths
                for depth in depths
                for index in range(ctx.settings.limit)
            ]
        return jobs

    def make(self, ctx: EvalContext, job: Job) -> Sample:
        rng = sample_rng(job.task, job.length, job.depth, job.index, ctx.settings.seed)
        chat = chat_wrap(ctx.tokenizer, ctx.settings.chat_template)
        reserve = self.reserve(ctx, job.task)
        if job.task in ruler.TASKS:
            return ruler.make_sample(ctx.tokenizer, job.task, job.length, rng, index=job.index, reserve=reserve,
                                     chat=chat, qa_data=ctx.settings.qa_data)
        return niah.make_sample(ctx.tokenizer, job.task, job.length, rng, depth=job.depth, reserve=reserve,
                                exact=ctx.settings.exact, chat=chat, haystack=ctx.settings.haystack)

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        listed = [r for r in records if r["task"] != "niah_grid"]
        per_task = {
            task: {"score": mean(r["score"] for r in group), "by_length": by(group, "length")}
            for task, group in _group(records, lambda r: r["task"]).items()
        }
        ruler_tasks = [t for t in per_task if t != "niah_grid"]
        by_length = {
            length: mean(per_task[t]["by_length"][length] for t in ruler_tasks if length in per_task[t]["by_length"])
            for length in by(listed, "length")
        }
        summary = {
            "score": mean(per_task[t]["score"] for t in ruler_tasks),
            "by_length": by_length,
            "by_task": per_task,
            "tasks_run": ruler_tasks,
            "samples": len(records),
            **throughput(records),
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


class RulerSuite(NiahSuite):
    name = "ruler"

    def tasks(self, ctx: EvalContext) -> list[str]:
        asked = ctx.settings.tasks.get(self.name)
        if asked:
            return asked
        try:  # the whole suite runs offline without the QA tasks (named in the report), rather than not at all
            for task in ruler.QA_SETS.values():
                ruler.load_qa(task, ctx.settings.qa_data)
        except ruler.QaUnavailable as error:
            warn_once(f"ruler: leaving out qa_1, qa_2 ({error})")
            return [t for t in RULER_TASKS if t not in ruler.QA_SETS]
        return list(RULER_TASKS)

    def reserve(self, ctx: EvalContext, task: str) -> int:
        return ctx.settings.max_new_tokens or ruler.TOKENS_TO_GENERATE.get(task, niah.DEFAULT_RESERVE)

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        summary = super().summarize(ctx, records)
        complete = set(summary["tasks_run"]) == set(RULER_TASKS)
        summary["ruler_average"] = complete
        if not complete:  # a mean over a subset is not RULER's average: no headline number, the table says what ran
            summary["score"] = None
            summary["mean_of_tasks_run"] = mean(summary["by_task"][t]["score"] for t in summary["tasks_run"])
        return summary

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        series = {task: {int(k): v for k, v in entry["by_length"].items()} for task, entry in summary["by_task"].items()}
        plots.lines(series, out_dir / "ruler_by_length.png", "RULER tasks", "context length (tokens)", "score (%)",
                    logx=True, percent=True)
        return ["ruler_by_length.png"]


_warned: set[str] = set()


def warn_once(line: str) -> None:
    if line not in _warned:
        _warned.add(line)
        print(f"warning: {line}", file=sys.stderr, flush=True)


def throughput(records: list[dict]) -> dict[str, float | None]:
    """samples/s and tokens/s (prompt + generated) over the wall time the runner gave each record (prompt building
    overlaps the model's work, so it counts only where the model waited for it); prefill and decode tokens/s over
    the model's own time. Records written before these fields existed count as missing (None when all are)."""
    timed = [r for r in records if "wall_seconds" in r]
    wall = sum(r["wall_seconds"] for r in timed)
    prefill = sum(r["prefill_seconds"] for r in timed)
    decode = sum(r["decode_seconds"] for r in timed)
    prompt = sum(r["prompt_tokens"] for r in timed)
    new = sum(r["new_tokens"] for r in timed)
    return {
        "samples_per_s": _rate(len(timed), wall),
        "tokens_per_s": _rate(prompt + new, wall),
        "prefill_tokens_per_s": _rate(prompt, prefill),
        "decode_tokens_per_s": _rate(new, decode),
    }


def _rate(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 3) if seconds > 0 else None


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
