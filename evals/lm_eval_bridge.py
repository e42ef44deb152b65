"""Optional bridge to lm-evaluation-harness (the `lm-eval` extra): lctk models are Hugging Face models, so its HFLM
wrapper runs them as they are.

Each task's entry is its main metric, the first of its `metric_list` (as lm-eval reports it: `acc`, `exact_match`,
..., under the first filter), with every other number lm-eval reported for it; the entry's score is the mean of the
requested tasks' main metrics, x 100 when a metric is a 0-1 figure. Tasks come from lm-eval's own registry plus the
YAML files of `include` (lm-eval's --include_path), or are paths of YAML files."""

from __future__ import annotations

import functools
from pathlib import Path

from lctk.errors import UserError

MEANING = "mean of the tasks' main metrics (x 100 for 0-1 figures)"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lctk[lm-eval]'") from error


@functools.lru_cache(maxsize=4)
def _task_manager(include: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include)  # indexes every registered task: seconds, hence the cache


def plan_lm_eval(tasks: str, include: str | Path | None = None) -> tuple[list[str], object]:
    """Check the task names (and the include folder) without a model: (names, lm-eval's TaskManager)."""
    require_lm_eval()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--lm-eval: give task names, e.g. --lm-eval hellaswag,arc_easy")
    if include is not None and not Path(include).is_dir():
        raise UserError(f"--lm-eval-include: not a folder: {include}")
    manager = _task_manager(None if include is None else str(Path(include).resolve()))
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        where = f" (nor in {include})" if include is not None else " (a local task folder goes in --lm-eval-include)"
        raise UserError(f"--lm-eval: unknown task {unknown[0]!r}: not registered with lm-eval{where}")
    return names, manager


def run_lm_eval(
    model, tokenizer, tasks: str, limit: int | None, batch_size: int, include: str | Path | None = None
) -> dict:
    names, manager = plan_lm_eval(tasks, include)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        output = lm_eval.simple_evaluate(
            # backend: HFLM guesses it from transformers' own model types, which lack lctk_hybrid
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal"),
            tasks=names, limit=limit, task_manager=manager,
        )
    except Exception as error:  # lm-eval's failures (a dataset it cannot read, a bad task file) are about the task
        lines = str(error).strip().splitlines()
        raise UserError(f"--lm-eval: {type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")) from None
    by_task = {task: main_metric(metrics, output.get("higher_is_better", {}).get(task, {}))
               for task, metrics in output["results"].items()}
    chosen = [by_task[n] for n in names if n in by_task] or list(by_task.values())
    scores = [100 * e["score"] if 0 <= e["score"] <= 1 else e["score"] for e in chosen if e["score"] is not None]
    return {"score": round(sum(scores) / len(scores), 4) if scores else None, "by_task": by_task, "limit": limit}


def main_metric(reported: dict, metric_order: dict) -> dict:
    """lm-eval's numbers for one task ({'acc,none': 0.5, 'acc_stderr,none': ..., 'sample_len': 4, ...}) -> its main
    metric, its value and all metric values. metric_order: the task's metrics in its metric_list order."""
    metrics = {k: float(v) for k, v in reported.items() if "," in k and isinstance(v, int | float)}
    values = {k: v for k, v in metrics.items() if "_stderr," not in k}
    ordered = [k for name in metric_order for k in values if k.split(",")[0] == name] + list(values)
    main = ordered[0] if ordered else None
    return {"metric": main, "score": values.get(main), "stderr": metrics.get(main.replace(",", "_stderr,", 1))
            if main else None, "metrics": values, "samples": reported.get("sample_len")}
