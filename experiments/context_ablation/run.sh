#!/usr/bin/env bash
# The context study: the fusion stage at a short and a 16x longer context (Llama 3.1's
# 8K:128K ratio), two seeds each, composed from the same language, vision and speech stage
# models, then the report with the write-up's claims beside the measured changes.
#   bash run.sh          CPU scale, 512 vs 8K tokens -> runs/cpu   (~25 min on 2 cores)
#   bash run.sh gpu      real scale, 8K vs 128K      -> runs/gpu
# The stage models are trained once into stages/ (herd-recipe, ~9 min on 2 cores); set
# STAGES=DIR to reuse a finished recipe directory (e.g. one from `make train`).
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/context_ablation
if [[ "${1:-cpu}" == gpu ]]; then
    contexts=8k,128k; baseline=context=8k; treatment=context=128k; runs=$study/runs/gpu
else
    contexts=512t,8k; baseline=context=512t; treatment=context=8k; runs=$study/runs/cpu
fi
stages=${STAGES:-$study/stages}
.venv/bin/herd-recipe --run-dir "$stages" --stages language,vision,speech
ckpt() { ls "$stages/$1"/checkpoints/step*.ckpt | tail -n 1; }
.venv/bin/herd-train -m experiment=fusion_digits context=$contexts seed=1,2 \
    trainer.max_steps=400 trainer.val_check_interval=200 \
    model.language.checkpoint="$(ckpt language)" model.vision.checkpoint="$(ckpt vision)" \
    model.speech.checkpoint="$(ckpt speech)" \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
# the fusion checkpoints are ~190 MB each; the results are the metrics, configs and events
rm -rf "$runs"/*/checkpoints
.venv/bin/herd-report $runs --claims $study/claims.yaml --baseline $baseline --treatment $treatment
