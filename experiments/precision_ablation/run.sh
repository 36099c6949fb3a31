#!/usr/bin/env bash
# The precision study: herd-train's default language job (the 6.6M-parameter `small` Llama
# at 512 tokens) in fp32, bf16 mixed and bf16 true, two seeds each, then the report.
#   bash run.sh          CPU, 150 steps per job          -> runs/cpu (~20 min on 2 cores)
#   bash run.sh gpu      one GPU, 300 steps, fp8 as well -> runs/gpu (H100 or newer, with
#                        the fp8 extra: pip install -e '.[fp8]')
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/precision_ablation
if [[ "${1:-cpu}" == gpu ]]; then
    precisions=fp32,bf16_mixed,bf16_true,fp8; steps=300; runs=$study/runs/gpu
else
    precisions=fp32,bf16_mixed,bf16_true; steps=150; runs=$study/runs/cpu
fi
.venv/bin/herd-train -m precision=$precisions seed=1,2 trainer.max_steps=$steps \
    trainer.val_check_interval=50 \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
rm -rf "$runs"/*/checkpoints   # the results are the metrics, configs and events
.venv/bin/herd-report $runs
