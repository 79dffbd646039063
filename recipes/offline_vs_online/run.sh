#!/usr/bin/env bash
# Offline vs iterative vs fully online DPO on SmolLM2-135M at a matched sampling budget (96
# problems x 4 answers each), on the quickstart's verifiable task, 3 seeds per arm. The held-out
# metric is strict exact match on 100 problems never trained on (objective: no judge to game).
#
#   bash recipes/offline_vs_online/run.sh [key=value ...]   (~1 h on 2 CPU cores; resumable)
#
# Seed-major: every arm's seed 0 runs first, so a partial experiment already compares every arm.
# Extra key=value overrides go to every run (e.g. rounds=2 for a shortened version).
set -euo pipefail
cd "$(dirname "$0")/../.."
make install >/dev/null
BIN=.venv/bin/online-dpo
OUT=${OUT:-runs}
SEEDS=${SEEDS:-0 1 2}
ARMS="offline iterative fully_online"
for seed in $SEEDS; do
  for arm in $ARMS; do
    $BIN run "recipes/offline_vs_online/$arm.yaml" --seeds "$seed" output_dir="$OUT" "$@"
  done
done
# Each arm's mean and interval over seeds and problems, and the arms side by side.
runs=()
for arm in $ARMS; do for seed in $SEEDS; do runs+=("$OUT/ovo_$arm/seed$seed"); done; done
$BIN compare "${runs[@]}" --out "$OUT/offline_vs_online"
# Head-to-head on the held-out problems: each online policy against the offline one of its seed.
for seed in $SEEDS; do
  for arm in iterative fully_online; do
    $BIN eval "$OUT/ovo_$arm/seed$seed" --against "$OUT/ovo_offline/seed$seed" --samples 2
  done
done
