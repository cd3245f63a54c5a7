#!/bin/bash
# Experiment 2: the effect of the teacher: KD from a weak, the main and a strong teacher at two data sizes.
set -euo pipefail
GPUS=${GPUS:-8}
for T in llama3b llama8b llama70b; do
  for F in 0.03 0.3; do
    torchrun --nproc-per-node "$GPUS" -m train_student train --config configs/paper/train_base.yaml \
        --cache "caches/tulu3-$T" --fraction "$F" --kd-weight 1 --ce-weight 0 --out "runs/paper/teacher-$T-f$F"
  done
done
kdcache report runs/paper/teacher-* --out runs/paper/report-teachers
