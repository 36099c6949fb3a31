#!/usr/bin/env bash
# Everything herd measures on one CUDA GPU (H100/H200 class), in under 10 minutes:
#   bash benchmarks/gpu.sh [RESULTS_DIR]     # default benchmarks/results/gpu
# 1. benchmarks/gpu.py: 1B-shape bf16 MFU at 8K (eager/compiled, flex_attention documents),
#    transformers on the same card, the longest context one training step fits;
# 2. herd-train on the card, a few steps each, metrics.json kept: the 1B 8K language
#    experiment under strategy=fsdp (bf16-mixed, flex_attention chosen on CUDA), the 1B 128K
#    experiment at 131072 tokens, and 8K with precision=fp8 where Transformer Engine is installed.
# Never part of CI or `make test`. Each part has its own time limit, so one that hangs or
# fails leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results/gpu}
mkdir -p "$results"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/card.txt"

timeout 330 python benchmarks/gpu.py --out "$results/gpu.jsonl"

train() {  # train NAME SECONDS OVERRIDES...: a short herd-train run, its metrics kept as NAME.json
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" python -m herd.train trainer.devices=1 trainer.log_every_n_steps=1 \
        trainer.enable_progress_bar=false test=false hydra.run.dir="/tmp/herd_gpu/$name" "$@" \
        && cp "/tmp/herd_gpu/$name/metrics.json" "$results/$name.json"
    echo "$name: exit $?"
}
train fsdp_bf16_8k 200 experiment=language_1b_8k strategy=fsdp trainer.max_steps=30 \
    trainer.accumulate_grad_batches=1 trainer.val_check_interval=30 trainer.limit_val_batches=2
# The 128K experiment at its last context stage (the passkey sweep left out: it is long).
train single_bf16_128k 330 experiment=long_context_1b_128k trainer.max_steps=3 \
    "data.context_stages=[[0,131072]]" "~callbacks.passkey" trainer.val_check_interval=3 \
    trainer.limit_val_batches=1
if python -c "import transformer_engine" 2>/dev/null; then
    train fp8_8k 120 experiment=language_1b_8k precision=fp8 trainer.max_steps=20 \
        trainer.accumulate_grad_batches=1 trainer.val_check_interval=20 trainer.limit_val_batches=1
fi
