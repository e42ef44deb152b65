"""The recall sweep's figure (the BASED paper's Figure 2 with run.sh's default preset): MQAR accuracy against state size, one line per mixer family.

Reads the comparison.json that `lctk eval --suite recall-throughput` wrote over the sweep's models (named
recall-<family>-d<width>-final, as run.sh passes runs/recall-<family>-d<width>/final; results.json when there was
only one model) and writes next to it
mqar_vs_state.md (family, width, state size, MQAR accuracy and tokens/s per length) and mqar_vs_state_<length>.png.

    python recipes/recall-sweep/figure.py runs/recall-sweep
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from lctk.evals.plots import lines

NAME = re.compile(r"recall-(.+)-d(\d+)(?:-final)?")


def rows_of(comparison: dict) -> list[dict]:
    rows = []
    for model, entry in comparison["recall_vs_state"].items():
        match = NAME.fullmatch(model)
        family, width = (match[1], int(match[2])) if match else (model, None)
        rows.append({"family": family, "width": width, **entry})
    return rows


def table(rows: list[dict], lengths: list[str]) -> str:
    last = lengths[-1]
    head = ["family", "width", f"state @{last}", *(f"MQAR @{n} (%)" for n in lengths),
            f"decode tok/s @{last}", f"prefill tok/s @{last}"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["family"], str(r["width"]), f"{r['state_size'][last]:,}"]
        cells += [f"{r['mqar'][n]:.1f}" for n in lengths]
        cells += [f"{r['decode_tokens_per_s'][last]:.0f}", f"{r['prefill_tokens_per_s'][last]:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def recall_by_model(folder: Path) -> dict:
    """comparison.json's recall_vs_state; one model (run.sh with one family and one width) writes only results.json."""
    if (folder / "comparison.json").is_file():
        return json.loads((folder / "comparison.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    e = results["results"]["recall-throughput"]
    return {"recall_vs_state": {results["model"]: {
        "state_size": e["state_size"], "recall": e["by_length"], "mqar": e["mqar_by_length"],
        "prefill_tokens_per_s": e["prefill_tokens_per_s"], "decode_tokens_per_s": e["decode_tokens_per_s"]}}}


def main(folder: Path) -> None:
    rows = rows_of(recall_by_model(folder))
    lengths = sorted(rows[0]["mqar"], key=int)
    (folder / "mqar_vs_state.md").write_text(table(rows, lengths))
    for n in lengths:
        series: dict[str, dict[float, float]] = {}
        for r in rows:
            series.setdefault(r["family"], {})[r["state_size"][n]] = r["mqar"][n]
        lines(series, folder / f"mqar_vs_state_{n}.png", f"MQAR recall vs state size ({n} tokens, {int(n) // 16} pairs)",
              "state size (elements per sequence)", "MQAR accuracy (%)", logx=True, percent=True)
    print(table(rows, lengths), end="")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/recall-sweep"))
