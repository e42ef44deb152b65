"""recall-throughput: how much a model recalls against what its state and speed cost.

Per length L:
  * text recall (`limit` samples, any LM): a key-value listing filling L tokens, then 8 queried keys with their values,
    teacher-forced; a query counts when every token of its value is the argmax prediction (tasks.recall);
  * MQAR (`limit` samples per pair count): Zoology's token-id format over the first min(V, 8192) ids with Zoology's
    L // 16 pairs, and at BASED's test lengths also BASED's pair counts (tasks.recall.BASED_TEST: up to L / 4);
    meaningful for models trained on that format (others score near 0);
  * state size in elements (model_facts.state_size), prefill tokens/s (one forward over L tokens after a warm-up),
    decode tokens/s (DECODE_TOKENS single-token steps through the cache after that prefill), and peak memory over
    prefill + decode (memory.peak_memory: CUDA allocator peak, or RSS growth on CPU).
score and by_length: text recall accuracy (%), None at lengths too short for its instruction and one pair (MQAR still
runs there: the Zoology-scale models of recipes/recall-sweep train at 64-256 tokens). mqar_by_length: MQAR accuracy
at L // 16 pairs; mqar_by_pairs: {length: {pairs: accuracy}} for every pair count run.
With several models, the runner also plots both against state size across them (recall_vs_state.png,
mqar_vs_state.png).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lctk.evals import plots
from lctk.evals.generation import stream
from lctk.evals.memory import peak_memory
from lctk.evals.model_facts import cache_of, model_device, state_size
from lctk.evals.suites.base import EvalContext, Job, Suite, mean
from lctk.labels import IGNORE
from lctk.tasks.prompts import PromptTooShort
from lctk.tasks.recall import (
    BASED_TEST,
    MQAR_VOCAB,
    default_pairs,
    make_mqar_sample,
    make_text_recall_sample,
    value_token_positions,
)
from lctk.tasks.sample import sample_rng

CHUNK = 2048
DECODE_TOKENS = 16


class RecallThroughputSuite(Suite):
    name = "recall-throughput"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        jobs = []
        for length in ctx.settings.lengths:
            kinds = ["text_recall"] + [f"mqar_kv{pairs}" for pairs in mqar_pairs(length)]
            jobs += [Job(self.name, kind, length, i) for kind in kinds for i in range(ctx.settings.limit)]
            jobs.append(Job(self.name, "throughput", length, 0))
        return jobs

    def run(self, ctx: EvalContext, jobs: list[Job], prepared: list) -> list[dict]:
        (job,) = jobs
        record = {"suite": self.name, "task": job.task, "length": job.length, "index": job.index, "seed": ctx.settings.seed}
        rng = sample_rng(job.task, job.length, job.index, ctx.settings.seed)
        if job.task == "text_recall":
            try:
                sample = make_text_recall_sample(ctx.tokenizer, job.length, rng, exact=ctx.settings.exact)
            except PromptTooShort as error:
                record.update(score=None, skipped=str(error))
                return [record]
            hits = _hits(ctx, sample.input_ids)
            found = [bool(hits[positions - 1].all()) for positions in value_token_positions(sample)]
            record.update(score=100.0 * sum(found) / len(found), queries=len(found), pairs=sample.meta["pairs"])
        elif job.task.startswith("mqar_kv"):
            # the ids lctk's MQAR training data draws from (lctk.data.tasks), not the padded embedding size
            vocab = min(MQAR_VOCAB, len(ctx.tokenizer), int(ctx.model.config.vocab_size))
            pairs = min(int(job.task.removeprefix("mqar_kv")), vocab // 2 - 1, job.length // 4)
            sample = make_mqar_sample(job.length, rng, vocab_size=vocab, num_kv_pairs=pairs)
            predicted = np.concatenate([step.predicted.numpy() for step, _ in stream(ctx.model, sample.input_ids, CHUNK)])
            positions = np.flatnonzero(sample.labels != IGNORE)  # the value is a label there, not in the input
            correct = predicted[positions - 1] == sample.labels[positions]
            record.update(score=100.0 * float(correct.mean()), pairs=pairs, vocab=vocab)
        else:
            record.update(_throughput(ctx, job.length))
        return [record]

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        text = _per_length(records, "text_recall", "score")
        speed = [r for r in records if r["task"] == "throughput"]
        return {
            "score": mean(v for v in text.values() if v is not None),
            "by_length": {str(k): v for k, v in text.items()},
            "mqar_by_length": {
                str(length): _per_length(records, f"mqar_kv{default_pairs(length)}", "score").get(length)
                for length in sorted({r["length"] for r in records})
            },
            "mqar_by_pairs": _by_pairs(records),
            **{
                field: {str(r["length"]): r[field] for r in sorted(speed, key=lambda r: r["length"])}
                for field in ("state_size", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_mb")
            },
        }

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        speed = {
            "prefill": {int(k): v for k, v in summary["prefill_tokens_per_s"].items()},
            "decode": {int(k): v for k, v in summary["decode_tokens_per_s"].items()},
        }
        plots.lines(speed, out_dir / "throughput.png", f"throughput ({ctx.model_name})", "context length (tokens)",
                    "tokens / s", logx=True, logy=True)
        recall = {
            name: {int(k): v for k, v in summary[key].items() if v is not None}
            for name, key in (("text recall", "by_length"), ("MQAR", "mqar_by_length"))
        }
        plots.lines(recall, out_dir / "recall_by_length.png", f"recall ({ctx.model_name})",
                    "context length (tokens)", "accuracy (%)", logx=True, percent=True)
        return ["throughput.png", "recall_by_length.png"]


RECALL_VS_STATE = {"recall_vs_state.png": ("by_length", "text recall"), "mqar_vs_state.png": ("mqar_by_length", "MQAR")}


def recall_vs_state(summaries: dict[str, dict], out_dir: Path) -> list[str]:
    """Across models: text recall and MQAR accuracy (%) against state size (elements), one line per model, one point
    per length; a plot only where some model has a score. Returns the file names written."""
    written = []
    for name, (key, label) in RECALL_VS_STATE.items():
        series = {}
        for model, summary in summaries.items():
            sizes, recall = summary["state_size"], summary.get(key, {})
            series[model] = {sizes[k]: recall[k] for k in recall if k in sizes and recall[k] is not None}
        if any(series.values()):
            plots.lines(series, out_dir / name, f"{label} vs state size", "state size (elements per sequence)",
                        f"{label} accuracy (%)", logx=True, percent=True)
            written.append(name)
    return written


def _hits(ctx: EvalContext, ids: np.ndarray) -> np.ndarray:
    """hits[t - 1]: whether token t was the argmax prediction."""
    return np.concatenate([step.hits.numpy() for step, _ in stream(ctx.model, ids, CHUNK)])


@torch.no_grad()
def _throughput(ctx: EvalContext, length: int) -> dict:
    model, device = ctx.model, model_device(ctx.model)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(ctx.settings.seed)).to(device)
    model(input_ids=ids[:, :16], use_cache=True)  # warm-up (kernels, allocator)
    with peak_memory(device) as memory:
        _sync(device)
        started = time.perf_counter()
        outputs = model(input_ids=ids, use_cache=True)
        _sync(device)
        prefill = time.perf_counter() - started
        cache, token = cache_of(outputs), outputs.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            outputs = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = cache_of(outputs), outputs.logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - started
    return {
        "state_size": state_size(model, length),
        "prefill_tokens_per_s": round(length / prefill, 2),
        "decode_tokens_per_s": round(DECODE_TOKENS / decode, 2),
        "peak_memory_mb": round(memory["bytes"] / 2**20, 2),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mqar_pairs(length: int) -> list[int]:
    """MQAR pair counts run at `length`: Zoology's default, and BASED's test counts where it tests that length."""
    return sorted({default_pairs(length), *(pairs for n, pairs in BASED_TEST if n == length)})


def _by_pairs(records: list[dict]) -> dict[str, dict[str, float]]:
    groups: dict[int, dict[int, list[float]]] = {}
    for record in records:
        if record["task"].startswith("mqar_kv"):
            groups.setdefault(record["length"], {}).setdefault(record["pairs"], []).append(record["score"])
    return {str(n): {str(p): mean(v) for p, v in sorted(by_p.items())} for n, by_p in sorted(groups.items())}


def _per_length(records: list[dict], task: str, field: str) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for record in records:
        if record["task"] == task:
            groups.setdefault(record["length"], [])
            if record.get(field) is not None:
                groups[record["length"]].append(record[field])
    return {length: mean(values) for length, values in sorted(groups.items())}
