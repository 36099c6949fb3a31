#!/usr/bin/env bash
# The precision study: the default language job (6.6M-parameter `small` Llama, 300 steps) in
# fp32, bf16 mixed and bf16 true, three seeds each, then the report. An estimate: about 1.5
# hours on a 2-core CPU, about 15 minutes on one GPU. `bash run.sh gpu` writes to runs/gpu
# (fp8 joins the list once configs/precision/fp8.yaml exists: it does not yet).
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/precision_ablation
precisions=fp32,bf16_mixed,bf16_true
runs=$study/runs/cpu
if [[ "${1:-cpu}" == gpu ]]; then
    runs=$study/runs/gpu
fi
.venv/bin/herd-train -m precision=$precisions seed=1,2,3 \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
.venv/bin/herd-report $runs
