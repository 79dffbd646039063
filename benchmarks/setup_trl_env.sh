#!/usr/bin/env bash
# Create .venv-trl (repo root) with TRL for benchmarks/vs_trl.py. Idempotent: once the stamp for
# this exact package list exists, a second run installs nothing.
#
#   bash benchmarks/setup_trl_env.sh
#
# torch is pinned to the local CPU build in the same pip command: an unpinned or newer torch
# would pull a multi-GB CUDA build. transformers / datasets / accelerate use the same pins as
# the main .venv (requirements/common.txt), which satisfy TRL 1.16 (transformers>=4.56.2), so
# both sides of the benchmark run the same model code.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-trl
PYTHON=${PYTHON:-python3}
PACKAGES=(
  "torch==2.13.0"
  "trl==1.16.0"
  "transformers==5.19.0"
  "datasets==5.2.0"
  "accelerate==1.15.0"
)
STAMP="$VENV/.installed-$(printf '%s\n' "${PACKAGES[@]}" | sha1sum | cut -c1-12)"

if [ -f "$STAMP" ]; then
  echo "[setup_trl_env] $VENV is up to date ($STAMP); nothing to install"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# Keep the venv out of git and out of `ruff check .` (ruff honours .gitignore files; its default
# excludes cover .venv but not .venv-trl).
printf '*\n' > "$VENV/.gitignore"

"$VENV/bin/pip" install "${PACKAGES[@]}"

# Refuse a CUDA torch: the benchmark is CPU-only and the CUDA wheel is several GB.
"$VENV/bin/python" - <<'EOF'
import torch, transformers, trl
assert "+cpu" in torch.__version__, f"expected the local CPU torch, got {torch.__version__}"
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: F401
print(f"[setup_trl_env] torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}")
EOF

rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[setup_trl_env] done: $STAMP"
