"""report.md: the scores, per-length tables and the plots of one model's run (and a comparison across models)."""

from __future__ import annotations

from pathlib import Path

from lctk.evals.lm_eval_bridge import MEANING as LM_EVAL_MEANING
from lctk.evals.plots import format_length

MEANING = {
    "passkey": "accuracy (%)",
    "niah": "string_match_all (%), mean over the NIAH tasks run (RULER's average is the ruler suite's)",
    "ruler": "RULER average (%) over its 13 tasks",
    "state-collapse": "late / early loss ratio (about 1.0: no collapse)",
    "recall-throughput": "text key-value recall (%); MQAR accuracy in its section",
    "perplexity": "perplexity (all tokens)",
    "lm-eval": LM_EVAL_MEANING,
}


def model_report(results: dict, path: Path) -> None:
    lines = [f"# lctk eval: {results['model']}", ""]
    config = results["config"]
    lines += [
        f"- model: `{config['model_path']}`",
        f"- lengths: {', '.join(format_length(n) for n in config['lengths']) or '-'}; limit {config['limit']}; "
        f"seed {results['seed']}; device {config['device']}, {config['dtype']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- time: {results['timings']['total_s']:.1f} s",
        "",
        "| suite | score | what the score is |",
        "| --- | --- | --- |",
    ]
    for suite, entry in results["results"].items():
        lines.append(f"| {suite} | {_number(entry.get('score'))} | {_meaning(suite, entry)} |")
    for suite, entry in results["results"].items():
        lines += ["", f"## {suite}", ""]
        if entry.get("samples_per_s"):
            rates = (("samples/s", "samples_per_s"), ("tokens/s end to end", "tokens_per_s"),
                     ("prefill tokens/s", "prefill_tokens_per_s"), ("decode tokens/s", "decode_tokens_per_s"))
            lines += [", ".join(f"{entry[key]:,.3g} {label}" for label, key in rates if entry.get(key)) +
                      " (prefill and decode over the model's own time)", ""]
        by_length = entry.get("by_length") or {}
        if by_length:
            lines += ["| length | " + " | ".join(format_length(int(k)) for k in by_length) + " |",
                      "| --- |" + " --- |" * len(by_length),
                      "| score | " + " | ".join(_number(v) for v in by_length.values()) + " |"]
            mqar = entry.get("mqar_by_length")  # recall-throughput's second recall figure
            if mqar:
                lines.append("| MQAR | " + " | ".join(_number(mqar.get(k)) for k in by_length) + " |")
        for task, task_entry in (entry.get("by_task") or {}).items():
            # niah's tasks are scored by length; lm-eval's by their main metric
            detail = (", ".join(f"{format_length(int(k))}: {_number(v)}" for k, v in task_entry["by_length"].items())
                      if "by_length" in task_entry else f"({task_entry.get('metric') or 'no metric'})")
            lines.append(f"- {task}: {_number(task_entry['score'])}  {detail}")
        for name in results.get("files", {}).get(suite, []):
            lines += ["", f"![{name}]({name})"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _meaning(suite: str, entry: dict) -> str:
    if suite == "ruler" and not entry.get("ruler_average"):
        ran = entry.get("tasks_run") or []
        return (f"no RULER average: {len(ran)} of 13 tasks ran ({', '.join(ran)}), their mean "
                f"{_number(entry.get('mean_of_tasks_run'))}")
    if suite == "passkey" and entry.get("variant"):
        return f"accuracy (%); variant {entry['variant']}"
    return MEANING.get(suite, "")


def comparison_report(results_by_model: dict[str, dict], plots: list[str], path: Path) -> None:
    suites = sorted({suite for results in results_by_model.values() for suite in results["results"]})
    lines = ["# lctk eval: comparison", "", "| model | " + " | ".join(suites) + " |", "| --- |" + " --- |" * len(suites)]
    for model, results in results_by_model.items():
        scores = [_number(results["results"].get(suite, {}).get("score")) for suite in suites]
        lines.append(f"| [{model}]({model}/report.md) | " + " | ".join(scores) + " |")
    lines += [f"\n![{name}]({name})" for name in plots]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
