"""run_suites: run eval suites on one model and write results.json, samples.jsonl, plots and report.md."""

from __future__ import annotations

import platform
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from lctk.errors import UserError
from lctk.evals.lm_eval_bridge import plan_lm_eval, run_lm_eval
from lctk.evals.models import length_limit, model_device, training_length, weights_fingerprint
from lctk.evals.plots import format_length
from lctk.evals.report import comparison_report, model_report
from lctk.evals.store import SampleStore, check_output_dir, write_json
from lctk.evals.suites import SUITES, EvalContext
from lctk.evals.tasks import niah, passkey, ruler
from lctk.evals.tokens import CHAT_MODES, fingerprint

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LIMIT = 10
LENGTH = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
MAX_LIMIT = 10**6  # samples per length (and depth)
MAX_LENGTH = 2**25  # tokens (32m): past any model's context, and a prompt that long would not fit in memory to build


def parse_lengths(spec: str | Iterable[int | str]) -> list[int]:
    """'1k,4k,16k' -> [1024, 4096, 16384] (k = 1024, m = 1024^2; plain integers are tokens)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    lengths = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            value = item
        else:
            match = LENGTH.match(str(item).strip())
            if not match:
                raise UserError(f"--lengths: cannot read {str(item).strip()!r} (use e.g. 1k,4k,16k; k = 1024 tokens)")
            value = float(match[1]) * {"": 1, "k": 1024, "m": 1024**2}[match[2].lower()]
            if value != int(value):
                raise UserError(f"--lengths: {str(item).strip()!r} is not a whole number of tokens")
            value = int(value)
        if not 0 < value <= MAX_LENGTH:
            raise UserError(f"--lengths: {item!r} must be from 1 to {MAX_LENGTH} tokens (32m)")
        lengths.append(value)
    if not lengths:
        raise UserError("--lengths: give at least one length, e.g. 1k,4k")
    return sorted(set(lengths))


def parse_suites(spec: str | Iterable[str], allow_none: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """Suite names and task names (a niah task selects it in niah, vt / cwe / fwe / qa_1 / qa_2 in ruler, a passkey
    variant in passkey) -> (suites in order, sub-tasks per suite).
    allow_none: no suite is fine (lm-eval tasks alone)."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    suites, tasks = [], {}
    for name in names:
        suite = "niah" if name in niah.TASKS else "ruler" if name in ruler.TASKS else name
        suite = "passkey" if name in passkey.VARIANTS else suite
        if suite not in SUITES:
            known = ", ".join(list(SUITES) + ["niah_<task>", *ruler.TASKS, *passkey.VARIANTS])
            raise UserError(f"--suite: unknown suite {name!r}; known: {known}")
        if suite not in suites:
            suites.append(suite)
        if name != suite:
            tasks.setdefault(suite, []).append(name)
    if "passkey" in tasks and "passkey" in names:  # "passkey" next to a variant runs both variants
        tasks["passkey"].insert(0, "passkey")
    if not suites and not allow_none:
        raise UserError("--suite: give at least one suite, e.g. passkey,niah (or none with --lm-eval TASKS)")
    return suites, tasks


def check_lengths(config, tokenizer, lengths: list[int], allow_longer: bool) -> int | None:
    limit = length_limit(config, tokenizer)
    too_long = [n for n in lengths if limit is not None and n > limit]
    if too_long and not allow_longer:
        raise UserError(
            f"--lengths: {format_length(max(too_long))} ({max(too_long)} tokens) is above the model's limit of {limit} "
            "tokens (max_position_embeddings or the tokenizer's model_max_length); pass --allow-longer to go past it"
        )
    return limit


def eval_plan(
    suites: str | Iterable[str] = ("passkey",),
    lengths: str | Iterable[int | str] = (1024,),
    output_dir: str | Path | None = None,
    limit: int = DEFAULT_LIMIT,
    seed: int = 0,
    depths: Iterable[float] = DEFAULT_DEPTHS,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    exact: bool = False,
    lm_eval: str | None = None,
    lm_eval_include: str | Path | None = None,
    chat_template: str = "auto",
    haystack: str | Path | None = None,
    qa_data: str | Path | None = None,
) -> tuple[list[str], EvalContext]:
    """Check every setting that needs no model: (suite names, a context without model and tokenizer). Without
    suites (lm-eval tasks alone) there are no lengths: nothing else reads them."""
    suite_names, tasks = parse_suites(suites, allow_none=bool(lm_eval))
    if lm_eval:
        plan_lm_eval(lm_eval, lm_eval_include)
    depths = [float(d) for d in depths]
    if any(not 0.0 <= d <= 1.0 for d in depths) or not depths:
        raise UserError(f"--depths: every depth must be within 0..1, got {depths}")
    for flag, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value < 1:
            raise UserError(f"{flag}: must be at least 1, got {value}")
    if limit > MAX_LIMIT:  # every job is listed up front
        raise UserError(f"--limit: at most {MAX_LIMIT} samples per length, got {limit}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if output_dir is not None:
        check_output_dir(Path(output_dir))
    ctx = EvalContext(parse_lengths(lengths) if suite_names else [], limit, seed, depths, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      exact=exact, tasks=tasks)
    if max_new_tokens is not None and ctx.lengths and max_new_tokens >= min(ctx.lengths):
        raise UserError(f"--max-new-tokens: {max_new_tokens} tokens leave no room for a prompt at the shortest length, "
                        f"{min(ctx.lengths)} tokens")
    if chat_template not in CHAT_MODES:
        raise UserError(f"--chat-template: use one of {', '.join(CHAT_MODES)}, got {chat_template!r}")
    for flag, path in (("--haystack", haystack), ("--qa-data", qa_data)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{flag}: {path} does not exist")
    ctx.chat_template = chat_template
    ctx.haystack, ctx.qa_data = (str(p) if p is not None else None for p in (haystack, qa_data))
    return suite_names, ctx


def check_model_fits(suite_names: list[str], ctx: EvalContext, config, tokenizer, allow_longer: bool) -> int | None:
    """Check what needs the model's config and tokenizer but not its weights: the vocabulary, the lengths against the
    model's limit and each suite's prompts at the shortest length. Returns the model's length limit."""
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and vocab_size < len(tokenizer):  # its ids past the embedding would crash the model
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab_size}")
    limit_tokens = check_lengths(config, tokenizer, ctx.lengths, allow_longer)
    with_tokenizer = replace(ctx, tokenizer=tokenizer, tokenizer_id=fingerprint(tokenizer))
    for name in suite_names:
        SUITES[name]().check(with_tokenizer)
    return limit_tokens


def run_suites(
    model,
    tokenizer,
    suites: str | Iterable[str] = ("passkey",),
    lengths: str | Iterable[int | str] = (1024,),
    output_dir: str | Path | None = None,
    limit: int = DEFAULT_LIMIT,
    seed: int = 0,
    depths: Iterable[float] = DEFAULT_DEPTHS,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    allow_longer: bool = False,
    exact: bool = False,
    model_name: str = "model",
    progress: bool = True,
    lm_eval: str | None = None,
    lm_eval_limit: int | None = None,
    lm_eval_include: str | Path | None = None,
    config: dict | None = None,
    chat_template: str = "auto",
    haystack: str | Path | None = None,
    qa_data: str | Path | None = None,
) -> dict:
    """Run the suites on a loaded model; returns the results dict (the content of results.json).

    With output_dir, also writes results.json, samples.jsonl, the plots and report.md there, and skips the jobs
    already in its samples.jsonl for this model's weights and tokenizer (resume; reused samples are announced on
    stderr). lm_eval: lm-evaluation-harness task names (needs the lm-eval extra), lm_eval_limit documents of each
    (None: all), with the task YAML files of the folder lm_eval_include. Every setting is checked before the first
    sample runs."""
    started = time.perf_counter()
    suite_names, planned = eval_plan(suites, lengths, output_dir, limit, seed, depths, batch_size, max_new_tokens, exact,
                                     lm_eval, lm_eval_include, chat_template, haystack, qa_data)
    limit_tokens = check_model_fits(suite_names, planned, model.config, tokenizer, allow_longer)
    out = Path(output_dir) if output_dir is not None else None
    store = SampleStore(out)
    if store.damaged:
        _note(f"warning: ignoring {store.damaged} damaged record(s) in {store.path}; their samples run again")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    ctx = replace(
        planned,
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
        "config": {
            **(config or {}),
            "suites": suite_names,
            "tasks": ctx.tasks,
            "lengths": ctx.lengths,
            "depths": ctx.depths,
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "chat_template": chat_template,
            "haystack": str(haystack) if haystack else "builtin",
            "length_limit": limit_tokens,
            "train_length": ctx.train_length,
            "device": str(ctx.device),
            "dtype": str(_dtype(model)).replace("torch.", ""),
            "tokenizer": ctx.tokenizer_id,
            "model_fingerprint": ctx.model_id,
        },
        "versions": versions(),
        "seed": seed,
        "timings": {},
        "files": {},
    }
    results["config"].setdefault("model_path", model_name)
    try:
        with _progress(progress) as bar:
            for name in suite_names:
                suite = SUITES[name]()
                suite_started = time.perf_counter()
                jobs = suite.jobs(ctx)
                keys = [suite.key(ctx, job) for job in jobs]
                todo = [(job, key) for job, key in zip(jobs, keys, strict=True) if key not in store]
                if len(todo) < len(jobs):
                    _note(f"{name}: reusing {len(jobs) - len(todo)} finished samples from {out} (same weights and tokenizer)")
                task = bar.add_task(f"{name} ({len(jobs) - len(todo)} done before)", total=len(jobs),
                                    completed=len(jobs) - len(todo)) if bar else None
                step = ctx.batch_size if suite.batched else 1
                for at in range(0, len(todo), step):
                    batch = todo[at : at + step]
                    for (_, key), record in zip(batch, suite.run(ctx, [job for job, _ in batch]), strict=True):
                        store.add({"key": key, "model": model_name, **record})
                    if bar:
                        bar.advance(task, len(batch))
                records = [store.records[key] for key in keys]
                results["results"][name] = suite.summarize(ctx, records)
                if out is not None:
                    results["files"][name] = suite.plot(ctx, results["results"][name], records, out)
                results["timings"][name + "_s"] = round(time.perf_counter() - suite_started, 3)
        if lm_eval:
            lm_started = time.perf_counter()
            results["results"]["lm-eval"] = run_lm_eval(model, tokenizer, lm_eval, lm_eval_limit, batch_size,
                                                        lm_eval_include)
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
