#!/usr/bin/env bash
# The GPU check: training (fp32/TF32 and bf16-mixed, eager and torch.compile) and generation throughput at
# GPT_CONFIG_124M on one CUDA GPU, printed as a Markdown table (bench/bench_gpu.py; written to
# bench/results/gpu.md too). Arguments go to bench_gpu.py (--help lists them). Without CUDA it exits 2 with
# one line. Runs with .venv/bin/python (`make install` creates it), or $PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "gpu_check: error: $PYTHON not found: run \`make install\` first, or set PYTHON" >&2
    exit 2
fi
exec "$PYTHON" -m bench.bench_gpu "$@"
