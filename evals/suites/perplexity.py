"""perplexity: by position bucket and by context length, on the builtin corpus (held-out documents first).

For each length L, `limit` consecutive windows of L tokens (window i starts at corpus token i x L; the held-out split
is about 60K tokens, so long windows run on into the training split), the tokenizer's leading special tokens
prepended. Each window is fed in chunks of CHUNK tokens through the model's cache. Position buckets are powers of two:
[1, 2), [2, 4), ..., so early positions (little context) and late ones (long context) are seen apart.
score = perplexity over every predicted token of every window; by_length[L] = perplexity of the length-L windows;
by_position[b] = perplexity of the tokens in bucket b (pooled over lengths).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lctk.evals import plots
from lctk.evals.generation import stream
from lctk.evals.suites.base import EvalContext, Job, Suite
from lctk.tasks.haystacks import corpus_tokens
from lctk.tasks.tokens import special_tokens_around

CHUNK = 2048


def corpus_window(ctx: EvalContext, length: int, index: int) -> np.ndarray:
    prefix = np.asarray(special_tokens_around(ctx.tokenizer)[0], dtype=np.int64)
    body = corpus_tokens(ctx.tokenizer, index * length, length - len(prefix))
    return np.concatenate([prefix, body])


def position_buckets(nll: np.ndarray) -> dict[str, list[float]]:
    """{bucket end: [nll sum, count]} for predicted positions 1..n in power-of-two buckets [2^k, 2^(k+1))."""
    positions = np.arange(1, len(nll) + 1)
    bucket = np.floor(np.log2(positions)).astype(int)
    out = {}
    for k in np.unique(bucket):
        chosen = nll[bucket == k]
        out[str(2 ** (int(k) + 1))] = [float(chosen.sum()), int(chosen.size)]
    return out


class PerplexitySuite(Suite):
    name = "perplexity"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        return [Job(self.name, "corpus", length, index) for length in ctx.settings.lengths for index in range(ctx.settings.limit)]

    def run(self, ctx: EvalContext, jobs: list[Job], prepared: list) -> list[dict]:
        (job,) = jobs
        ids = corpus_window(ctx, job.length, job.index)
        nll = np.concatenate([step.nll.numpy() for step, _ in stream(ctx.model, ids, CHUNK)])
        return [
            {
                "suite": self.name,
                "task": job.task,
                "length": job.length,
                "index": job.index,
                "seed": ctx.settings.seed,
                "nll_sum": float(nll.sum()),
                "tokens": int(nll.size),
                "buckets": position_buckets(nll),
            }
        ]

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        by_length: dict[int, list[float]] = {}
        by_position: dict[int, list[float]] = {}
        per_length_position: dict[int, dict[int, list[float]]] = {}
        for record in records:
            _add(by_length, record["length"], record["nll_sum"], record["tokens"])
            for end, (total, count) in record["buckets"].items():
                _add(by_position, int(end), total, count)
                _add(per_length_position.setdefault(record["length"], {}), int(end), total, count)
        total = [sum(v[0] for v in by_length.values()), sum(v[1] for v in by_length.values())]
        return {
            "score": _ppl(total),
            "by_length": {str(k): _ppl(v) for k, v in sorted(by_length.items())},
            "by_position": {str(k): _ppl(v) for k, v in sorted(by_position.items())},
            "by_length_position": {
                str(length): {str(k): _ppl(v) for k, v in sorted(buckets.items())}
                for length, buckets in sorted(per_length_position.items())
            },
            "tokens": int(total[1]),
        }

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        series = {
            f"L={plots.format_length(int(length))}": {int(k): v for k, v in buckets.items()}
            for length, buckets in summary["by_length_position"].items()
        }
        marks = {"train length": ctx.train_length} if ctx.train_length else None
        plots.lines(series, out_dir / "perplexity_by_position.png", "perplexity by position",
                    "position (end of power-of-two bucket)", "perplexity", logx=True, logy=True, marks=marks)
        return ["perplexity_by_position.png"]


def _add(table: dict, key: int, total: float, count: int) -> None:
    entry = table.setdefault(key, [0.0, 0])
    entry[0] += total
    entry[1] += count


def _ppl(entry: list[float]) -> float | None:
    return round(math.exp(entry[0] / entry[1]), 4) if entry[1] else None
