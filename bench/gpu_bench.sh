#!/usr/bin/env bash
# The GPU verification of issue 5 in one command: raw encoders in fp32/bf16 at batch 1..256, then
# binserve on the GPU at concurrency 1..256, with GPU utilisation samples and efficiency.
# Usage: bash bench/gpu_bench.sh [extra flags for bench/gpu_bench.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi: CPU run"
exec "$PY" -m bench.gpu_bench "$@"
