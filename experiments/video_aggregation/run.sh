#!/usr/bin/env bash
# The frames-per-group study: the video adapter (experiment=video_digits) with its temporal
# aggregator merging G = 1, 4 or 8 consecutive frames into one group of latents, two seeds
# each, composed from the same language and vision stage models, then the report. The
# stage models are trained once into stages/; set STAGES=DIR to reuse a finished recipe
# directory (e.g. one from `make train`).
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/video_aggregation
runs=$study/runs/cpu
stages=${STAGES:-$study/stages}
.venv/bin/herd-recipe --run-dir "$stages" --stages language,vision
ckpt() { ls "$stages/$1"/checkpoints/step*.ckpt | tail -n 1; }
.venv/bin/herd-train -m experiment=video_digits model.video.frames_per_group=4,8,1 seed=1,2 \
    model.language.checkpoint="$(ckpt language)" model.vision.checkpoint="$(ckpt vision)" \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs
rm -rf "$runs"/*/checkpoints   # the results are the metrics, configs and events
.venv/bin/herd-report $runs
