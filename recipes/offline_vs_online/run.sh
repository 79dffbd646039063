#!/usr/bin/env bash
# Offline vs iterative vs fully online DPO on SmolLM2-135M at matched budgets
# (48 prompts, <= 48 pairs, 6 optimizer steps of 8 pairs each), evaluated on held-out prompts
# by a held-out judge (judges.rules:InformativeAnswerJudge), then compared.
#
#   bash recipes/offline_vs_online/run.sh [key=value ...]     (~25 min on 2 CPU cores)
#
# Extra key=value overrides go to all three runs (e.g. rounds=2 for a shortened version).
set -euo pipefail
cd "$(dirname "$0")/../.."
make install >/dev/null
BIN=.venv/bin/online-dpo
OUT=${OUT:-runs}
for recipe in offline iterative fully_online; do
  $BIN run "recipes/offline_vs_online/$recipe.yaml" output_dir="$OUT" "$@"
done
$BIN compare "$OUT/ovo_offline" "$OUT/ovo_iterative" "$OUT/ovo_fully_online" --out "$OUT/offline_vs_online"
# Head-to-head on the held-out prompts: each online policy against the offline one.
for run in ovo_iterative ovo_fully_online; do
  $BIN eval "$OUT/$run" --against pi0 --against "$OUT/ovo_offline" --samples 2
done
