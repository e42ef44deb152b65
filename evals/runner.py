"""run_suites: run eval suites on one model and write results.json, samples.jsonl, plots and report.md."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

from lctk.errors import UserError
from lctk.evals.batching import run_batches
from lctk.evals.fingerprints import weights_fingerprint
from lctk.evals.lm_eval_bridge import run_lm_eval
from lctk.evals.model_facts import length_limit, model_device, training_length
from lctk.evals.plots import format_length
from lctk.evals.report import comparison_report, model_report
from lctk.evals.settings import EvalSettings
from lctk.evals.store import SampleStore, check_output_dir, write_json
from lctk.evals.suites import SUITES, EvalContext
from lctk.tasks.tokens import fingerprint


def check_lengths(config, tokenizer, lengths: tuple[int, ...], allow_longer: bool) -> int | None:
    limit = length_limit(config, tokenizer)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long and not allow_longer:
        raise UserError(
            f"--lengths: {format_length(max(too_long))} ({max(too_long)} tokens) is above the model's limit of {limit} "
            "tokens (max_position_embeddings or the tokenizer's model_max_length); pass --allow-longer to go past it"
        )
    return limit


def check_model_fits(settings: EvalSettings, config, tokenizer) -> int | None:
    """Check what needs the model's config and tokenizer but not its weights: the vocabulary, the lengths against the
    model's limit and each suite's prompts at the shortest length. Returns the model's length limit."""
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and vocab_size < len(tokenizer):  # its ids past the embedding would crash the model
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
    limit_tokens = check_lengths(config, tokenizer, settings.lengths, settings.allow_longer)
    with_tokenizer = EvalContext(settings, tokenizer=tokenizer, tokenizer_id=fingerprint(tokenizer))
    for name in settings.suite_names:
        SUITES[name]().check(with_tokenizer)
    return limit_tokens


def run_suites(model, tokenizer, settings: EvalSettings, output_dir: str | Path | None = None, model_name: str = "model",
               progress: bool = True, config: dict | None = None) -> dict:
    """Run the suites of `settings` on a loaded model; returns the results dict (the content of results.json).

    With output_dir, also writes results.json, samples.jsonl, the plots and report.md there, and skips the jobs
    already in its samples.jsonl for this model's weights and tokenizer (resume; reused samples are announced on
    stderr). `config`: more facts about the run to record (e.g. the model's path). Everything is checked before the
    first sample runs."""
    started = time.perf_counter()
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        check_output_dir(out)
    limit_tokens = check_model_fits(settings, model.config, tokenizer)
    store = SampleStore(out)
    if store.damaged:
        _note(f"warning: ignoring {store.damaged} damaged record(s) in {store.path}; their samples run again")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ctx = EvalContext(
        settings,
        model=model,
        tokenizer=tokenizer,
        model_name=model_name,
        model_id=weights_fingerprint(model),
        tokenizer_id=fingerprint(tokenizer),
        train_length=training_length(model),
        device=model_device(model),
    )
    results: dict = {
        "model": model_name,
        "results": {},
        "settings": settings.record(),
        "config": {
            **(config or {}),
            "suites": list(settings.suite_names),
            "tasks": settings.tasks,
            "lengths": list(settings.lengths),
            "limit": settings.limit,
            "length_limit": limit_tokens,
            "train_length": ctx.train_length,
            "device": str(ctx.device),
            "dtype": str(_dtype(model)).replace("torch.", ""),
            "tokenizer": ctx.tokenizer_id,
            "model_fingerprint": ctx.model_id,
        },
        "versions": versions(),
        "seed": settings.seed,
        "timings": {},
        "files": {},
    }
    results["config"].setdefault("model_path", model_name)
    try:
        with _progress(progress) as bar:
            for name in settings.suite_names:
                suite = SUITES[name]()
                suite_started = time.perf_counter()
                jobs = suite.jobs(ctx)
                keys = [suite.key(ctx, job) for job in jobs]
                todo = [(job, key) for job, key in zip(jobs, keys, strict=True) if key not in store]
                if len(todo) < len(jobs):
                    _note(f"{name}: reusing {len(jobs) - len(todo)} finished samples from {out} (same weights and tokenizer)")
                task = bar.add_task(f"{name} ({len(jobs) - len(todo)} done before)", total=len(jobs),
                                    completed=len(jobs) - len(todo)) if bar else None
                for batch, batch_records in run_batches(suite, ctx, todo, settings.batch_size, settings.memory_budget):
                    for (_, key), record in zip(batch, batch_records, strict=True):
                        store.add({"key": key, "model": model_name, **record})
                    if bar:
                        bar.advance(task, len(batch))
                records = [store.records[key] for key in keys]
                results["results"][name] = suite.summarize(ctx, records)
                if out is not None:
                    results["files"][name] = suite.plot(ctx, results["results"][name], records, out)
                results["timings"][name + "_s"] = round(time.perf_counter() - suite_started, 3)
        if settings.lm_eval:
            lm_started = time.perf_counter()
            results["results"]["lm-eval"] = run_lm_eval(model, tokenizer, settings.lm_eval, settings.lm_eval_limit,
                                                        settings.batch_size, settings.lm_eval_include)
            results["timings"]["lm-eval_s"] = round(time.perf_counter() - lm_started, 3)
    finally:
        if was_training:
            model.train()
    results["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_json(out / "results.json", results)
        model_report(results, out / "report.md")
    return results


def compare(results_by_model: dict[str, dict], output_dir: Path) -> dict:
    """Across models: scores per suite (comparison.json), recall vs state size, and report.md linking each model."""
    from lctk.evals.suites.recall_throughput import recall_vs_state

    plots = []
    recall = {m: r["results"]["recall-throughput"] for m, r in results_by_model.items() if "recall-throughput" in r["results"]}
    if recall:
        plots += recall_vs_state(recall, output_dir)
    comparison = {
        "models": list(results_by_model),
        "scores": {m: {s: e.get("score") for s, e in r["results"].items()} for m, r in results_by_model.items()},
        "recall_vs_state": {
            m: {"state_size": e["state_size"], "recall": e["by_length"], "mqar": e["mqar_by_length"],
                "prefill_tokens_per_s": e["prefill_tokens_per_s"], "decode_tokens_per_s": e["decode_tokens_per_s"]}
            for m, e in recall.items()
        },
    }
    write_json(output_dir / "comparison.json", comparison)
    comparison_report(results_by_model, plots, output_dir / "report.md")
    return comparison


def versions() -> dict[str, str]:
    import transformers

    import lctk

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "lctk": lctk.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": device,
    }


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dtype(model) -> torch.dtype | None:
    try:
        return next(model.parameters()).dtype
    except (StopIteration, AttributeError):
        return None


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> None:
        return None


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True))
