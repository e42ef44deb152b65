#!/usr/bin/env bash
# The extend demo: the quickstart model (trained at L = 256 tokens; run `make demo` first) extended to 4L and 8L,
# attention and recurrent methods alone and together, training-free, plus the staged continued-training recipe;
# then one table of passkey accuracy and perplexity at 1x..8x L, before and after (the figures in BENCHMARKS.md).
# Usage: recipes/extend-demo.sh [model folder]   (default runs/quickstart/final; about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-runs/quickstart/final}
lctk=(python -m lctk.cli)
runs=()
for variant in "4 yarn" "4 state_norm" "4 yarn,state_norm" "4 yarn,calibrate_dt" "8 yarn" "8 yarn,state_norm"; do
  read -r factor methods <<<"$variant"
  out="runs/extend-demo/x${factor}-${methods//,/+}"
  "${lctk[@]}" extend --model "$model" --method "$methods" --factor "$factor" --output "$out" --set eval.limit=10
  runs+=("$out")
done
"${lctk[@]}" extend recipes/extend-quickstart-train.yaml --set extend.model="$model" \
  --output runs/extend-demo/x4-yarn-trained+calibrate_dt --set eval.limit=10
runs+=(runs/extend-demo/x4-yarn-trained+calibrate_dt)
python - "${runs[@]}" <<'EOF'
import json, sys
from pathlib import Path

def row(name, figures):
    passkey = figures["passkey"]["by_length"]
    ppl = figures["perplexity"]["by_length"]
    cells = [f"{passkey[n]:.0f}% / {ppl[n]:.1f}" for n in passkey]
    return f"| {name} | " + " | ".join(cells) + " |"

first = json.loads((Path(sys.argv[1]) / "extend.json").read_text())
lengths = list(first["before"]["passkey"]["by_length"])
print("| passkey / perplexity at | " + " | ".join(f"{n} ({int(n) // first['original_length']}x)" for n in lengths) + " |")
print("|---" * (len(lengths) + 1) + "|")
print(row("before (trained at 256)", first["before"]))
for run in sys.argv[1:]:
    print(row(Path(run).name, json.loads((Path(run) / "extend.json").read_text())["after"]))
EOF
