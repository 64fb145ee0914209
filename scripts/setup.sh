#!/usr/bin/env bash
# Creates .venv (if absent) and installs alignbench into it, with torch pinned to 2.13.0 when no
# torch is installed yet (the CPU build where the local index provides it; the CUDA build on a
# user's GPU machine). An existing torch is kept: we never pull a second one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
python -c "import alignbench, torch; print('alignbench', alignbench.__version__, '| torch', torch.__version__)"
