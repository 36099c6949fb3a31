#!/usr/bin/env bash
# The CPU-scale context study, end to end (about two hours on 2 cores):
#   1. pre-train at 512 tokens (experiment=context_short)
#   2. measure it at 4x its length with RoPE unextended (herd-eval extrapolate=true)
#   3. extend to 2048 tokens with llama3 RoPE scaling (experiment=context_extension)
#   4. measure short-context loss before and after the extension (herd-eval context=512t)
# and write results.md from the metrics.json files.
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
runs=${HERD_LOG_DIR:-logs}/context_study
quiet=(trainer.enable_progress_bar=false)
passkey=(+callbacks.passkey._target_=herd.callbacks.PasskeyRetrieval '+callbacks.passkey.lengths=[512,1024,2048]'
         +callbacks.passkey.samples_per_cell=10)

.venv/bin/herd-train experiment=context_short "${quiet[@]}" hydra.run.dir=$runs/short
.venv/bin/herd-eval ckpt_path=$runs/short/checkpoints/last.ckpt context=2k extrapolate=true \
    "${passkey[@]}" "${quiet[@]}" hydra.run.dir=$runs/short_at_2k
.venv/bin/herd-train experiment=context_extension short_ckpt=$runs/short/checkpoints/last.ckpt \
    "${quiet[@]}" hydra.run.dir=$runs/extended
.venv/bin/herd-eval ckpt_path=$runs/extended/checkpoints/last.ckpt context=512t \
    "${quiet[@]}" hydra.run.dir=$runs/extended_at_512
.venv/bin/herd-eval ckpt_path=$runs/short/checkpoints/last.ckpt context=512t \
    "${quiet[@]}" hydra.run.dir=$runs/short_at_512
.venv/bin/python experiments/long_context/summarize.py $runs > experiments/long_context/results.md
cat experiments/long_context/results.md
