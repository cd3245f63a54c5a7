#!/usr/bin/env bash
# kd_loss kernels on one GPU (an H200: under 5 minutes): correctness of impl="fused" against
# impl="chunked" at real sizes, then fwd+bwd time and peak memory of naive / chunked / fused
# (and Liger's fused linear CE if importable), then the target row's TFLOP/s. Needs torch + triton
# (kdcache need not be installed: the benchmark is train_student/kernels/bench_gpu.py, run from the root).
#   bash bench/kernel_gpu.sh [--quick] [--kind reverse_kl] [--tail renormalize] ...
#   bash bench/kernel_gpu.sh --dry-run      # CPU check of the script (Triton interpreter, tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m train_student.kernels.bench_gpu "$@"
