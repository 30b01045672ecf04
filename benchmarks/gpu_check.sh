#!/usr/bin/env bash
# One GPU, no network, < 8 minutes: real-size step benchmarks + a 20-step `higgs-tune train` (see gpu_check.py).
set -euo pipefail
cd "$(dirname "$0")/.." && PYTHONPATH=src:. "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py --out "${1:-gpu-check}"
