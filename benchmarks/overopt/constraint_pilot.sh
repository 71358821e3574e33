#!/bin/bash
# CDPO's constraint in a regime that moves fidelity (issue 16, item 2): CDPO against the same run with its
# dual step frozen (lagrange lr 1e-12: lambda stays 0 while fidelity is still scored), on pilot seeds only.
#   bash benchmarks/overopt/constraint_pilot.sh OUT PROMPTS LR SEED [SEED ...]
# PROMPTS: a benchmark's prompts/train.txt; two runs at a time; then
#   PYTHONPATH=shared python benchmarks/overopt/constraint_table.py OUT/*/
set -euo pipefail
if [ $# -lt 4 ]; then echo "usage: constraint_pilot.sh OUT PROMPTS LR SEED [SEED ...] (got $# arguments)" >&2; exit 2; fi
OUT=$1 PROMPTS=$2 LR=$3; shift 3
mkdir -p "$OUT"
run() {  # name seed extra-args...
  local name=$1 seed=$2; shift 2
  python -m rewardtune.cli train --config configs/testbed.yaml --out "$OUT/$name-lr$LR-seed$seed" \
    --set training.seed="$seed" --set training.epochs=24 --set checkpointing.every_epochs=100 \
    --set logging.progress_bars=false --set algorithm.name=cdpo --set training.learning_rate="$LR" \
    --set training.stat_tracking.enabled=false --set algorithm.critic.learning_rate=1.0e-2 \
    --set 'algorithm.constraints=[{reward: {name: testbed_fidelity}, relative_margin: 0.05}]' \
    --set prompts.source="$PROMPTS" "$@" > "$OUT/$name-lr$LR-seed$seed.log" 2>&1
}
for seed in "$@"; do
  run cdpo "$seed" &
  run frozen "$seed" --set algorithm.lagrange.learning_rate=1.0e-12 &
  wait
done
