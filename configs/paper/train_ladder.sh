#!/bin/bash
# Experiment 1: KD vs SFT across data sizes, on one cache. Same tokens, same steps per epoch:
# SFT is the same trainer with kd_weight 0.
set -euo pipefail
CACHE=${CACHE:-caches/tulu3-llama8b}
GPUS=${GPUS:-8}
for F in 0.01 0.03 0.1 0.3 1.0; do
  for LOSS in kd sft; do
    if [ "$LOSS" = kd ]; then W="--kd-weight 1 --ce-weight 0"; else W="--kd-weight 0 --ce-weight 1"; fi
    torchrun --nproc-per-node "$GPUS" -m train_student train --config configs/paper/train_base.yaml \
        --cache "$CACHE" --fraction "$F" $W --out "runs/paper/ladder-$LOSS-f$F"
  done
done
kdcache report runs/paper/ladder-* --out runs/paper/report-ladder
