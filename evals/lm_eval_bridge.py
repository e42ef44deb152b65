"""Optional bridge to lm-evaluation-harness (the `lm-eval` extra): lctk models are Hugging Face models, so its HFLM
wrapper runs them as they are. The entry's score is the mean of each task's first reported metric, x 100 when it is
a 0-1 figure."""

from __future__ import annotations

from lctk.errors import UserError


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'lctk[lm-eval]'") from error


def run_lm_eval(model, tokenizer, tasks: str, limit: int | None, batch_size: int) -> dict:
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--lm-eval: give task names, e.g. --lm-eval hellaswag,arc_easy")
    try:
        output = lm_eval.simple_evaluate(
            model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=names, limit=limit
        )
    except KeyError as error:
        raise UserError(f"--lm-eval: unknown task {error}") from error
    per_task = {
        task: {k: v for k, v in metrics.items() if isinstance(v, int | float) and "stderr" not in k}
        for task, metrics in output["results"].items()
    }
    firsts = [next(iter(metrics.values())) for metrics in per_task.values() if metrics]
    scores = [100 * v if 0 <= v <= 1 else v for v in firsts]
    return {"score": round(sum(scores) / len(scores), 4) if scores else None, "by_task": per_task}
