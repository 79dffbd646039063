#!/usr/bin/env bash
# The cost in quality of asynchronous online DPO: the iterative arm at generation.max_staleness 0
# (iterative.yaml), 1 and 2 (stale1.yaml, stale2.yaml), at the same budget, 3 seeds each, on the
# quickstart's verifiable task. Held out: strict exact match on 100 problems never trained on.
#
#   bash recipes/offline_vs_online/staleness.sh [key=value ...]   (~35 min on 2 CPU cores; resumable)
#
# The in-process engine draws the stale rounds in turn (no overlap): the schedule, and so the
# result, is the one a vllm_server sampler gives while overlapping (benchmarks/async_bench.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
make install >/dev/null
BIN=.venv/bin/online-dpo
OUT=${OUT:-runs}
SEEDS=${SEEDS:-0 1 2}
ARMS="iterative stale1 stale2"
for seed in $SEEDS; do
  for arm in $ARMS; do
    $BIN run "recipes/offline_vs_online/$arm.yaml" --seeds "$seed" output_dir="$OUT" "$@"
  done
done
runs=()
for arm in $ARMS; do for seed in $SEEDS; do runs+=("$OUT/ovo_$arm/seed$seed"); done; done
$BIN compare "${runs[@]}" --out "$OUT/staleness"
