#!/usr/bin/env bash
# The context study at CPU scale: the fusion model at 512 and 8K tokens (Llama 3.1's 8K:128K
# ratio, 1:16), three seeds each, then the report with the write-up's claims beside the
# measured changes. An estimate: 1-2 hours on a 2-core CPU. `bash run.sh gpu`: 8K vs 128K.
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/context_ablation
if [[ "${1:-cpu}" == gpu ]]; then
    contexts=8k,128k; baseline=context=8k; treatment=context=128k; runs=$study/runs/gpu
else
    contexts=512t,8k; baseline=context=512t; treatment=context=8k; runs=$study/runs/cpu
fi
.venv/bin/herd-train -m experiment=fusion_digits context=$contexts seed=1,2,3 \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
.venv/bin/herd-report $runs --claims $study/claims.yaml --baseline $baseline --treatment $treatment
