#!/usr/bin/env bash
# The fine-tuning study: the fusion stage under each strategy (full, partial, adapter,
# lora), two seeds each, composed from the same language, vision and speech stage models,
# then the report. About 80 minutes on 2 CPU cores: the stages ~20 min, then 8 fusion jobs
# of 600 steps at ~7 min each. The stage models are trained once into stages/; set
# STAGES=DIR to reuse a finished recipe directory (e.g. one from `make train`).
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/finetune_ablation
runs=$study/runs/cpu
stages=${STAGES:-$study/stages}
.venv/bin/herd-recipe --run-dir "$stages" --stages language,vision,speech
ckpt() { ls "$stages/$1"/checkpoints/step*.ckpt | tail -n 1; }
.venv/bin/herd-train -m experiment=fusion_digits finetune=full,partial,adapter,lora seed=1,2 \
    trainer.max_steps=600 trainer.val_check_interval=300 \
    model.language.checkpoint="$(ckpt language)" model.vision.checkpoint="$(ckpt vision)" \
    model.speech.checkpoint="$(ckpt speech)" \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
rm -rf "$runs"/*/checkpoints   # the results are the metrics, configs and events
.venv/bin/herd-report $runs
