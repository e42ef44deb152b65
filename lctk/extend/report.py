"""report.md of an extend run: before/after figures by length, and one plot per figure with both curves.

Figures (when their suite ran): perplexity by context length and per-token loss by position (perplexity suite,
loss = ln perplexity per power-of-two position bucket, at the longest length), passkey accuracy by length, and the
state-collapse suite's late/early loss ratio and state growth (largest final / first-chunk RMS of a state tensor)
on the corpus input and on the repeated-newline stress input. The original training length and the target length are marked on the plots.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lctk.evals import plots
from lctk.evals.plots import format_length

# (suite, summary key holding {length: value}, what it is, plot file or None)
BY_LENGTH = (
    ("perplexity", "by_length", "perplexity", "perplexity_by_length.png"),
    ("passkey", "by_length", "passkey accuracy (%)", "passkey_by_length.png"),
    ("state-collapse", "by_length", "late / early loss ratio", "loss_ratio_by_length.png"),
    ("state-collapse", "state_growth", "largest per-head state-norm growth (end / training length)", None),
    ("state-collapse", "newlines_by_length", "loss over the last quarter (nats), repeated newlines", None),
    ("state-collapse", "newlines_state_growth", "state growth, repeated newlines", None),
)


def write_report(results: dict[str, Any], run_dir: Path, lengths: list[int]) -> None:
    before, after = results.get("before") or {}, results.get("after") or {}
    original, target = results["original_length"], results["target_length"]
    marks = {"trained": original, "target": target}
    record = results.get("extension") or {}
    lines = [
        f"# lctk extend: {results['model']}",
        "",
        f"- trained at {original} tokens, extended to {target} ({target / original:g}x)",
    ]
    if record.get("rope"):
        lines.append(f"- attention: RoPE {record['rope']}")
    for step in results.get("recurrent", []):
        lines.append(f"- recurrent: {step['method']} -> {_brief(step['set'])}")
    for number, stage in enumerate(record.get("stages", []), start=1):
        lines.append(f"- stage {number}: {stage}")

    lines += ["", "| figure | " + " | ".join(format_length(n) for n in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
    figures = []
    for suite, key, label, plot_file in BY_LENGTH:
        if suite not in before and suite not in after:
            continue
        for name, results_of in (("before", before), ("after", after)):
            values = (results_of.get(suite) or {}).get(key) or {}
            lines.append(f"| {label}, {name} | " + " | ".join(_number(values.get(str(n))) for n in lengths) + " |")
        if plot_file:
            series = {
                name: {int(k): v for k, v in ((r.get(suite) or {}).get(key) or {}).items() if v is not None}
                for name, r in (("before", before), ("after", after))
            }
            plots.lines(series, run_dir / plot_file, f"{label}: before and after", "context length (tokens)", label,
                        logx=True, marks=marks)
            figures.append(plot_file)

    positions = {
        name: _loss_by_position(r.get("perplexity") or {}) for name, r in (("before", before), ("after", after))
    }
    if any(positions.values()):
        longest = max(lengths)
        plots.lines({k: v for k, v in positions.items() if v}, run_dir / "loss_by_position.png",
                    f"per-token loss by position (perplexity suite, {format_length(longest)}-token windows)",
                    "position (end of power-of-two bucket)", "loss (nats)", logx=True, marks=marks)
        figures.insert(0, "loss_by_position.png")
    lines += ["", *[f"![{name}]({name})" for name in figures], "",
              "Suite outputs: [before](eval/before/report.md), [after](eval/after/report.md)."]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _loss_by_position(perplexity: dict) -> dict[int, float]:
    """ln(perplexity) per position bucket at the longest length evaluated."""
    per_length = perplexity.get("by_length_position") or {}
    if not per_length:
        return {}
    buckets = per_length[max(per_length, key=int)]
    return {int(end): math.log(ppl) for end, ppl in buckets.items() if ppl}


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _brief(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())
