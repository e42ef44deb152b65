"""state-collapse: does a model stay sane far beyond its training length?

Two inputs per length L: `corpus` (the builtin corpus, held-out documents first) and `newlines` (L copies of the
newline token, or of the end-of-text token for tokenizers that drop whitespace: a degenerate input that drives
recurrent states towards a fixed point or blows them up). Each is fed
in CHUNKS chunks through the model's cache (use_cache=True), recording
  * the per-token loss, averaged in BUCKETS equal position buckets (the training length is marked on the plot);
  * after every chunk, statistics of every state tensor found in the cache (any object: transformers' DynamicCache
    for Mamba-2 or attention, lctk's HybridCache, ...; see models.iter_tensors): mean, RMS and max |x| of the tensor,
    and at the end RMS and max |x| per head (per index of the tensor's second dimension, the head axis of Mamba-2's
    SSM state). A tensor whose shape changes from chunk to chunk is a KV cache (it grows with L) and is left out;
    with a single chunk, tensors named *key* or *value* are.
score (corpus input, longest length) and by_length: loss ratio = mean NLL over the last quarter of positions / mean NLL
over [T/2, T), T the training length when the config gives one (and T < L) else L/4: about 1.0 when the model holds
up, well above 1 when it collapses. state_growth[L]: the largest final-RMS / first-chunk-RMS over the state tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lctk.evals import plots
from lctk.evals.models import iter_tensors, stream
from lctk.evals.suites.base import EvalContext, Job, Suite
from lctk.evals.suites.perplexity import corpus_window
from lctk.evals.tokens import encode_batch, special_tokens_around

CHUNKS = 32
BUCKETS = 64
INPUTS = ("corpus", "newlines")


def state_statistics(tensor: torch.Tensor, per_head: bool) -> dict:
    x = tensor[0].detach().float()  # first sequence of the batch
    stats = {
        "mean": _significant(x.mean()),
        "rms": _significant(x.pow(2).mean().sqrt()),
        "max": _significant(x.abs().max()),
    }
    if per_head and x.dim() >= 2:
        heads = x.reshape(x.shape[0], -1)
        stats["head_rms"] = [_significant(v) for v in heads.pow(2).mean(1).sqrt()]
        stats["head_max"] = [_significant(v) for v in heads.abs().amax(1)]
    return stats


def _significant(value) -> float:
    return float(f"{float(value):.6g}")


def trace_states(model, ids: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int], dict[str, dict]]:
    """Stream ids through the model: (per-token NLL, chunk end positions, {tensor path: trajectory}) where a
    trajectory holds the shape, per-chunk mean / rms / max lists and the final per-head statistics. KV tensors
    (growing shapes) are dropped."""
    losses, ends, traces = [], [], {}
    for step, cache in stream(model, ids, chunk):  # the cache is updated in place: read it before the next step
        losses.append(step.nll.numpy())
        ends.append(step.end)
        final = step.end == len(ids)
        for path, tensor in iter_tensors(cache):
            if tensor.numel() == 0 or not tensor.is_floating_point():
                continue
            trace = traces.setdefault(path, {"shapes": set(), "mean": [], "rms": [], "max": []})
            trace["shapes"].add(tuple(tensor.shape))
            stats = state_statistics(tensor, per_head=final)
            for name in ("mean", "rms", "max"):
                trace[name].append(stats[name])
            if final:
                trace["head_rms"], trace["head_max"] = stats.get("head_rms"), stats.get("head_max")
    recurrent = {}
    for path, trace in traces.items():
        grows = len(trace["shapes"]) > 1 or len(trace["rms"]) < len(ends)
        if len(ends) == 1:
            grows = any(word in path.lower() for word in ("key", "value"))
        if not grows:
            (shape,) = trace.pop("shapes")
            recurrent[path] = {"shape": list(shape), **trace}
    return np.concatenate(losses), ends, recurrent


class StateCollapseSuite(Suite):
    name = "state-collapse"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        return [Job(self.name, kind, length, 0) for length in ctx.lengths for kind in INPUTS]

    def run(self, ctx: EvalContext, jobs: list[Job]) -> list[dict]:
        (job,) = jobs
        if job.task == "corpus":
            ids = corpus_window(ctx, job.length, 0)
        else:
            prefix = special_tokens_around(ctx.tokenizer)[0]
            newline = encode_batch(ctx.tokenizer, ["\n"], with_offsets=False)[0].ids[-1:]
            if not len(newline):  # the tokenizer drops whitespace: repeat its end-of-text token instead
                newline = np.asarray([ctx.tokenizer.eos_token_id or 0], dtype=np.int64)
            ids = np.concatenate([np.asarray(prefix, dtype=np.int64), np.repeat(newline, job.length - len(prefix))])
        nll, ends, states = trace_states(ctx.model, ids, max(job.length // CHUNKS, 16))
        edges = np.linspace(0, len(nll), BUCKETS + 1).astype(int)
        return [
            {
                "suite": self.name,
                "task": job.task,
                "length": job.length,
                "index": 0,
                "seed": ctx.seed,
                "loss_positions": [int(e) for e in edges[1:]],
                "loss": [round(float(nll[a:b].mean()), 5) if b > a else None for a, b in zip(edges[:-1], edges[1:], strict=True)],
                "loss_ratio": _loss_ratio(nll, ctx.train_length),
                "chunk_ends": ends,
                "states": states,
                "state_growth": _growth(states),
            }
        ]

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        corpus = sorted((r for r in records if r["task"] == "corpus"), key=lambda r: r["length"])
        newlines = sorted((r for r in records if r["task"] == "newlines"), key=lambda r: r["length"])
        longest = corpus[-1] if corpus else None
        return {
            "score": longest["loss_ratio"] if longest else None,
            "by_length": {str(r["length"]): r["loss_ratio"] for r in corpus},
            "newlines_by_length": {str(r["length"]): r["loss_ratio"] for r in newlines},
            "state_growth": {str(r["length"]): r["state_growth"] for r in corpus},
            "newlines_state_growth": {str(r["length"]): r["state_growth"] for r in newlines},
            "state_tensors": len(longest["states"]) if longest else 0,
            "final_states": {
                path: {"shape": s["shape"], "mean": s["mean"][-1], "rms": s["rms"][-1], "max": s["max"][-1],
                       "head_rms": s.get("head_rms"), "head_max": s.get("head_max")}
                for path, s in (longest["states"].items() if longest else [])
            },
            "train_length": ctx.train_length,
        }

    def plot(self, ctx: EvalContext, summary: dict, records: list[dict], out_dir: Path) -> list[str]:
        marks = {"train length": ctx.train_length} if ctx.train_length else None
        losses = {
            f"{r['task']} L={plots.format_length(r['length'])}": {
                p: v for p, v in zip(r["loss_positions"], r["loss"], strict=True) if v is not None
            }
            for r in sorted(records, key=lambda r: (r["task"], r["length"]))
        }
        plots.lines(losses, out_dir / "state_collapse_loss.png", "per-token loss by position",
                    "position (tokens)", "loss (nats)", marks=marks)
        files = ["state_collapse_loss.png"]
        corpus = [r for r in records if r["task"] == "corpus" and r["states"]]
        if corpus:
            longest = max(corpus, key=lambda r: r["length"])
            norms = {
                path: dict(zip(longest["chunk_ends"], trace["rms"], strict=True))
                for path, trace in longest["states"].items()
            }
            plots.lines(norms, out_dir / "state_collapse_states.png",
                        f"state RMS as the input advances (corpus, L={plots.format_length(longest['length'])})",
                        "position (tokens)", "RMS", logy=True, marks=marks)
            files.append("state_collapse_states.png")
        return files


def _loss_ratio(nll: np.ndarray, train_length: int | None) -> float | None:
    n = len(nll)
    reference = train_length if train_length and train_length < n else n // 4
    early = nll[reference // 2 : reference]
    late = nll[n - n // 4 :]
    if not len(early) or not len(late):
        return None
    return round(float(late.mean() / max(early.mean(), 1e-6)), 4)


def _growth(states: dict[str, dict]) -> float | None:
    ratios = [s["rms"][-1] / s["rms"][0] for s in states.values() if s["rms"] and s["rms"][0] > 0]
    return round(max(ratios), 4) if ratios else None

