#!/usr/bin/env bash
# Create .venv and install neox-jax with the test and serve extras (CPU torch + transformers for parity tests), the
# notebooks extra (the test suite executes notebooks/) and the gpu-plan extra (XLA's GPU compiler for the planner
# and the GPU-compile tests; about 2.6 GB and 30 s more).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build these machines carry.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0 \
  || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[test,notebooks,gpu-plan,serve]"
echo "neox-jax installed in .venv"
