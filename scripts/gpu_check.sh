#!/usr/bin/env bash
# The GPU check (incontext/bench/gpucheck.py): full-size random transformers of FLUX.1 Kontext,
# FLUX.2 [klein] 4B and Qwen-Image-Edit, 1024² edits through our engine and stock diffusers,
# batch 1 and 8 in flight, with parity. Budget: about 15 minutes on one H100/H200.
#   scripts/gpu_check.sh [OUT_DIR] [extra gpucheck options, e.g. --families kontext]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu}"; shift || true
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -m incontext.bench.gpucheck --out "$OUT" "$@"
echo "report: $OUT/gpu_check.md"
