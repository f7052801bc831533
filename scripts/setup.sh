#!/usr/bin/env bash
# Create .venv and install neox-jax with the test extra (CPU torch + transformers for parity tests) and the
# notebooks extra (the test suite executes notebooks/).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build these machines carry.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0 \
  || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
.venv/bin/python -m pip install -q -e ".[test,notebooks]"
echo "neox-jax installed in .venv"
