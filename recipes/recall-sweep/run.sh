#!/usr/bin/env bash
# The recall sweep: 6 mixer families x 3 widths on MQAR, then recall-throughput on every model.
# Meant for a GPU (each run is 4000 steps of 64 x 512 tokens); on a CPU pass e.g. STEPS=200 for a smoke run.
# Usage: recipes/recall-sweep/run.sh [widths...]   (default 64 128 256)
set -euo pipefail
cd "$(dirname "$0")/../.."
widths=("${@:-64 128 256}")
steps=${STEPS:-}
models=()
for family in attention sliding-window mamba2 based titans lact; do
  for width in ${widths[@]}; do
    name="recall-${family}-d${width}"
    extra=()
    [[ -n "$steps" ]] && extra+=(--set "train.steps=${steps}")
    lctk train "recipes/recall-sweep/${family}.yaml" --set "model.hidden_size=${width}" --set "run.name=${name}" "${extra[@]}"
    models+=("runs/${name}")
  done
done
# one comparison over all models: comparison.json holds MQAR accuracy and state size per model and length
lctk eval --model "$(IFS=,; echo "${models[*]}")" --suite recall-throughput --lengths 256,512 --limit 64 \
  --output runs/recall-sweep
