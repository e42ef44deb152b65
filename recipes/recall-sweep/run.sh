#!/usr/bin/env bash
# The recall sweep: 8 mixer families x 3 widths on MQAR, then MQAR accuracy vs state size.
# Default (GPU): the recipes as written, set up like the BASED paper's Figure 2 (Zoology's 2 x [BaseConv, mixer]
# without MLPs, vocabulary 8,192, BASED's train mixture, its test lengths 64-1024 and pair counts up to L/4).
# PRESET=cpu: a small preset, NOT Figure 2: 600 steps of 32 x 64 tokens (MQAR documents of 16-64 tokens, Zoology's
# L/16 pairs), byte vocabulary (tokenizer bytes, model.vocab_size 257, as in the 2026-11-28 CPU table), windows
# scaled to the shorter context, widths 32 64 128, evaluated at 32 and 64 tokens; about 45 minutes on one core
# (OMP_NUM_THREADS=1).
# FAMILIES="lact titans" trains and evaluates only those families (default: all eight).
# Usage: [PRESET=cpu] [STEPS=n] [FAMILIES="..."] recipes/recall-sweep/run.sh [widths...]
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v lctk >/dev/null || lctk() { python -m lctk.cli "$@"; }
preset=${PRESET:-gpu}
common=()
case "$preset" in
  gpu) default_widths="64 128 256"; lengths=64,128,256,512,1024 ;;
  cpu)
    default_widths="32 64 128"; lengths=32,64
    common=(--set tokenizer=bytes --set model.vocab_size=257
            --set data.seq_len=64 --set 'data.sources=[{task: mqar, options: {min_length: 16, max_length: 64}}]'
            --set train.steps=600 --set train.batch_size=32 --set train.lr=3.0e-3 --set train.warmup_steps=20
            --set eval.suites=[]) ;;
  *) echo "PRESET must be gpu or cpu, got '$preset'" >&2; exit 2 ;;
esac
widths=("${@:-$default_widths}")
[[ -n "${STEPS:-}" ]] && common+=(--set "train.steps=${STEPS}")
models=()
for family in ${FAMILIES:-attention sliding-window mamba2 based titans lact gated-deltanet kda}; do
  extra=()
  if [[ "$preset" == cpu ]]; then  # windows below the 64-token context, chunks that update inside it
    case "$family" in
      sliding-window) extra=(--set model.attention.window=16) ;;
      titans) extra=(--set model.titans.window=8) ;;
      lact) extra=(--set model.lact.window=8 --set model.lact.chunk_size=16) ;;
    esac
  fi
  for width in ${widths[@]}; do
    name="recall-${family}-d${width}"
    models+=("runs/${name}/final")
    [[ -f "runs/${name}/final/config.json" ]] && continue  # finished before: a rerun only evaluates
    lctk train "recipes/recall-sweep/${family}.yaml" --set "model.hidden_size=${width}" --set "run.name=${name}" \
      "${common[@]}" "${extra[@]}" --overwrite
  done
done
# every model through the recall-throughput suite (MQAR, text recall where the length holds it, state size, speed),
# then the figure: MQAR accuracy against state size, one line per family (runs/recall-sweep/mqar_vs_state_*.png)
lctk eval --model "$(IFS=,; echo "${models[*]}")" --suite recall-throughput --lengths "$lengths" --limit 64 \
  --output runs/recall-sweep
python recipes/recall-sweep/figure.py runs/recall-sweep
