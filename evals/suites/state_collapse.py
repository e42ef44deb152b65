"""state-collapse: does a model stay sane far beyond its training length? Measured as Stuffed Mamba (Chen et al.,
2024) does: per-head state norms over position, and per-head statistics of what writes the state.

Two inputs per length L, fed in CHUNKS chunks through the model's cache (use_cache=True):
  * `corpus`: the builtin corpus's held-out documents (text.heldout_tokens: past their ~60K tokens they repeat in a
    new order, never running into training text; `repeats_from` says where);
  * `newlines`: L copies of the newline token (the end-of-text token for tokenizers that drop whitespace), the
    degenerate input that drives recurrent states to a fixed point or blows them up.
Recorded per input and length:
  * per-token loss in BUCKETS position buckets; `late_loss`: the absolute mean loss over the last quarter (nats);
    for the corpus also `loss_ratio` = late_loss / mean loss over [T/2, T) (T the training length when the config
    gives one and T < L, else L/4): about 1.0 when the model holds up;
  * every recurrent state tensor of the cache (any cache object: models.iter_tensors; KV caches, whose shape grows,
    are left out): mean, RMS and max |x| after every chunk and, for tensors with a head axis (dimension 1 of a
    tensor of 3+ dimensions not named *conv*, e.g. Mamba-2's [batch, heads, N, P] state), each head's Frobenius
    norm after every chunk (`head_norm`: chunks x heads);
  * for Mamba-2 layers, per head and chunk (`mixers`: {layer: {quantity: chunks x heads}}): the mean of Δ (dt, after
    softplus and any dt_scale), of the decay exp(A Δ), and the RMS of B and of x (after the convolution): lctk's
    Mamba2 reports them to a probe (Mamba2.register_state_probe), transformers' Mamba2Mixer Δ and decay through a
    forward hook on its in_proj.
    Other mixers have no such input-dependent decay (BASED, BaseConv) or keep theirs inside their state update
    (Titans, LaCT): their state norms are recorded.
score (corpus input, longest length) and by_length: the corpus loss ratio. newlines_by_length: the newline input's
late_loss (absolute: a ratio to its near-zero early loss swings wildly). state_growth[L]: the largest per-head norm
growth, norm at L / norm at the chunk ending nearest the reference position (T or L/4), over every head of every
state tensor: one exploding head shows, and the figure does not depend on the first chunk's length.
Plots: the loss by position, the state RMS, and head x position heatmaps of the state norms and of Δ, decay, B, x.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lctk.evals import plots
from lctk.evals.generation import stream
from lctk.evals.model_facts import iter_tensors
from lctk.evals.suites.base import EvalContext, Job, Suite
from lctk.tasks.haystacks import heldout_tokens
from lctk.tasks.tokens import encode_batch, special_tokens_around

CHUNKS = 32
BUCKETS = 64
INPUTS = ("corpus", "newlines")
QUANTITIES = ("dt", "decay", "B", "x")


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


def _has_heads(path: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 3 and "conv" not in path.lower()


def trace_states(model, ids: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int], dict[str, dict]]:
    """Stream ids through the model: (per-token NLL, chunk end positions, {tensor path: trajectory}) where a
    trajectory holds the shape, per-chunk mean / rms / max lists, per-chunk per-head norms (tensors with a head axis)
    and the final per-head RMS / max. KV tensors (growing shapes) are dropped."""
    losses, ends, traces = [], [], {}
    for step, cache in stream(model, ids, chunk):  # the cache is updated in place: read it before the next step
        losses.append(step.nll.numpy())
        ends.append(step.end)
        final = step.end == len(ids)
        for path, tensor in iter_tensors(cache):
            if tensor.numel() == 0 or not tensor.is_floating_point():
                continue
            trace = traces.setdefault(path, {"shapes": set(), "mean": [], "rms": [], "max": [], "head_norm": []})
            trace["shapes"].add(tuple(tensor.shape))
            stats = state_statistics(tensor, per_head=final)
            for name in ("mean", "rms", "max"):
                trace[name].append(stats[name])
            if _has_heads(path, tensor):
                norms = tensor[0].detach().float().flatten(1).norm(dim=1)
                trace["head_norm"].append([_significant(v) for v in norms])
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


@contextlib.contextmanager
def mixer_probes(model) -> Iterator[dict[str, dict[str, list]]]:
    """Per-head Δ / decay / B / x of every Mamba-2 layer, one row per forward call (= per chunk), while inside."""
    stats: dict[str, dict[str, list]] = {}
    undo = []

    def record(name: str, quantity: str, per_head: torch.Tensor) -> None:
        stats.setdefault(name, {}).setdefault(quantity, []).append([_significant(v) for v in per_head.float().cpu()])

    for name, module in model.named_modules() if isinstance(model, torch.nn.Module) else []:
        if not (hasattr(module, "A_log") and hasattr(module, "dt_bias")):
            continue
        if hasattr(module, "register_state_probe"):  # lctk's Mamba2: Δ, the decay, B and x as it computes them

            def probe(dt, decay, b, x, name=name, heads=module.num_heads):
                record(name, "dt", dt[0].mean(0))
                record(name, "decay", decay[0].mean(0))
                groups = b.shape[2]  # head h reads group h // (heads / groups)
                b_rms = b[0].float().pow(2).mean(-1).sqrt().mean(0)
                record(name, "B", b_rms.repeat_interleave(heads // groups))
                record(name, "x", x[0].float().pow(2).mean(-1).sqrt().mean(0))

            undo.append(module.register_state_probe(probe).remove)
        elif hasattr(module, "in_proj") and hasattr(module, "num_heads"):  # transformers' Mamba2Mixer: Δ and decay

            def hook(_, __, output, name=name, module=module):
                dt = F.softplus(output[0, :, -module.num_heads :].float() + module.dt_bias.float())
                record(name, "dt", dt.mean(0))
                record(name, "decay", torch.exp(-torch.exp(module.A_log.float()) * dt).mean(0))

            undo.append(module.in_proj.register_forward_hook(hook).remove)
    try:
        yield stats
    finally:
        for restore in undo:
            restore()


class StateCollapseSuite(Suite):
    name = "state-collapse"

    def jobs(self, ctx: EvalContext) -> list[Job]:
        return [Job(self.name, kind, length, 0) for length in ctx.settings.lengths for kind in INPUTS]

    def run(self, ctx: EvalContext, jobs: list[Job], prepared: list) -> list[dict]:
        (job,) = jobs
        prefix = np.asarray(special_tokens_around(ctx.tokenizer)[0], dtype=np.int64)
        repeats_from = None
        if job.task == "corpus":
            body, repeats_from = heldout_tokens(ctx.tokenizer, job.length - len(prefix))
            ids = np.concatenate([prefix, body])
        else:
            newline = encode_batch(ctx.tokenizer, ["\n"], with_offsets=False)[0].ids[-1:]
            if not len(newline):  # the tokenizer drops whitespace: repeat its end-of-text token instead
                newline = np.asarray([ctx.tokenizer.eos_token_id or 0], dtype=np.int64)
            ids = np.concatenate([prefix, np.repeat(newline, job.length - len(prefix))])
        with mixer_probes(ctx.model) as mixers:
            nll, ends, states = trace_states(ctx.model, ids, max(job.length // CHUNKS, 16))
        edges = np.linspace(0, len(nll), BUCKETS + 1).astype(int)
        reference = _reference(ctx.train_length, len(ids))
        return [
            {
                "suite": self.name,
                "task": job.task,
                "length": job.length,
                "index": 0,
                "seed": ctx.settings.seed,
                "loss_positions": [int(e) for e in edges[1:]],
                "loss": [round(float(nll[a:b].mean()), 5) if b > a else None for a, b in zip(edges[:-1], edges[1:], strict=True)],
                "late_loss": round(float(nll[len(nll) - len(nll) // 4 :].mean()), 5),
                "loss_ratio": _loss_ratio(nll, reference),
                "repeats_from": repeats_from if repeats_from is not None and repeats_from < len(ids) else None,
                "chunk_ends": ends,
                "reference_position": reference,
                "states": states,
                "mixers": mixers,
                "state_growth": _growth(states, ends, reference),
            }
        ]

    def summarize(self, ctx: EvalContext, records: list[dict]) -> dict:
        corpus = sorted((r for r in records if r["task"] == "corpus"), key=lambda r: r["length"])
        newlines = sorted((r for r in records if r["task"] == "newlines"), key=lambda r: r["length"])
        longest = corpus[-1] if corpus else None
        return {
            "score": longest["loss_ratio"] if longest else None,
            "by_length": {str(r["length"]): r["loss_ratio"] for r in corpus},
            "late_loss_by_length": {str(r["length"]): r["late_loss"] for r in corpus},
            "newlines_by_length": {str(r["length"]): r["late_loss"] for r in newlines},
            "state_growth": {str(r["length"]): r["state_growth"] for r in corpus},
            "newlines_state_growth": {str(r["length"]): r["state_growth"] for r in newlines},
            "state_tensors": len(longest["states"]) if longest else 0,
            "final_states": {
                path: {"shape": s["shape"], "mean": s["mean"][-1], "rms": s["rms"][-1], "max": s["max"][-1],
                       "head_rms": s.get("head_rms"), "head_max": s.get("head_max"),
                       "head_norm": s["head_norm"][-1] if s["head_norm"] else None}
                for path, s in (longest["states"].items() if longest else [])
            },
            "mixers": {  # per layer and head: the mean of each quantity within the reference length and beyond it
                layer: {q: _within_beyond(rows, longest["chunk_ends"], longest["reference_position"])
                        for q, rows in quantities.items()}
                for layer, quantities in (longest["mixers"].items() if longest else [])
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
        for kind in INPUTS:
            runs = [r for r in records if r["task"] == kind and r["states"]]
            if not runs:
                continue
            longest = max(runs, key=lambda r: r["length"])
            at = f"{kind}, L={plots.format_length(longest['length'])}"
            if kind == "corpus":
                norms = {path: dict(zip(longest["chunk_ends"], trace["rms"], strict=True))
                         for path, trace in longest["states"].items()}
                plots.lines(norms, out_dir / "state_collapse_states.png", f"state RMS as the input advances ({at})",
                            "position (tokens)", "RMS", logy=True, marks=marks)
                files.append("state_collapse_states.png")
            panels = {path: np.asarray(t["head_norm"]).T for path, t in longest["states"].items() if t["head_norm"]}
            for quantity in QUANTITIES:
                for layer, rows in longest["mixers"].items():
                    if rows.get(quantity):
                        panels[f"{layer} {quantity}"] = np.asarray(rows[quantity]).T
            if panels:
                name = f"state_collapse_heads_{kind}.png"
                plots.head_heatmaps(panels, longest["chunk_ends"], out_dir / name,
                                    f"per head, by position ({at}): state norms, then Δ, decay, B, x",
                                    mark=ctx.train_length)
                files.append(name)
        return files


def _reference(train_length: int | None, n: int) -> int:
    return train_length if train_length and train_length < n else n // 4


def _loss_ratio(nll: np.ndarray, reference: int) -> float | None:
    n = len(nll)
    early = nll[reference // 2 : reference]
    late = nll[n - n // 4 :]
    if not len(early) or not len(late):
        return None
    return round(float(late.mean() / max(early.mean(), 1e-6)), 4)


def _growth(states: dict[str, dict], ends: list[int], reference: int) -> float | None:
    """The largest per-head norm at the end / norm at the chunk end nearest `reference`, over all heads."""
    at = int(np.argmin([abs(e - reference) for e in ends]))
    ratios = [
        end / start
        for trace in states.values() if trace["head_norm"]
        for start, end in zip(trace["head_norm"][at], trace["head_norm"][-1], strict=True) if start > 0
    ]
    return round(max(ratios), 4) if ratios else None


def _within_beyond(rows: list[list[float]], ends: list[int], reference: int) -> dict[str, list[float]]:
    values = np.asarray(rows)  # chunks x heads
    inside = np.asarray(ends[: len(values)]) <= reference
    return {
        "within": [_significant(v) for v in values[inside].mean(0)] if inside.any() else None,
        "beyond": [_significant(v) for v in values[~inside].mean(0)] if (~inside).any() else None,
    }
