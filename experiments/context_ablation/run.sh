#!/usr/bin/env bash
# The context study on long review documents: the fusion stage at a short context and at a
# 4x longer one (extended with llama3 RoPE scaling and staged growth, as Llama 3.1 went 8K
# -> 128K), three seeds each, both arms from the same fusion model and the same training
# tokens per arm. That model is the recipe's fusion_digits stage (it reads images and
# speech placed right before a question) after a shared reading stage on short review
# documents (it learns to read an item from further back, within 512 tokens). Then the
# report with the write-up's claims beside the measured changes, overall and for answers
# whose evidence lies beyond / within the short context.
#   bash run.sh          CPU scale, 512 vs 2048 tokens -> runs/reviews_cpu3 (third design)
#   bash run.sh gpu      real scale, 8K vs 128K        -> runs/reviews_gpu
# The recipe (language, vision, speech, fusion) and the reading stage are trained once into
# stages/; set STAGES=DIR to reuse a finished recipe directory (e.g. one from `make train`).
set -euo pipefail
cd "$(dirname "$0")/../.."
make -s install
study=experiments/context_ablation
if [[ "${1:-cpu}" == gpu ]]; then
    arms=context_reviews_8k,context_reviews_128k; runs=$study/runs/reviews_gpu
    extra=(precision=bf16_mixed data.doc_tokens=[4000,120000] data.evidence_far_tokens=8192)
else
    arms=context_reviews_512,context_reviews_2k; runs=$study/runs/reviews_cpu3
    extra=()
fi
stages=${STAGES:-$study/stages}
.venv/bin/herd-recipe --run-dir "$stages"
fusion=$(ls "$stages"/fusion/checkpoints/step*.ckpt | tail -n 1)
# the shared reading stage; its figures are its validations (the tests are the arms')
.venv/bin/herd-train experiment=context_reviews_reading ++model.init_from="$fusion" \
    trainer.enable_progress_bar=false hydra.run.dir="$stages/reading" auto_resume=true test=false
reading=$(ls "$stages"/reading/checkpoints/step*.ckpt | tail -n 1)
# seeds outermost: the jobs run seed by seed, both arms each; `++` because a multirun first
# composes without the experiment, whose model has no init_from
.venv/bin/herd-train -m seed=1,2,3 experiment=$arms "${extra[@]}" ++model.init_from="$reading" \
    trainer.enable_progress_bar=false hydra.sweep.dir=$runs auto_resume=true
# the fusion checkpoints are large; the results are the metrics, configs, events, answers
rm -rf "$runs"/*/checkpoints
baseline=experiment=${arms%%,*}; treatment=experiment=${arms##*,}
.venv/bin/herd-report $runs --claims $study/claims_reviews.yaml \
    --baseline $baseline --treatment $treatment
[[ "${1:-cpu}" == gpu ]] && exit 0
# Control (CPU): at equal tokens per step the short arm trains on 17 documents' questions per
# step, the long arm on 9. The short arm again with 9 documents per step (the long arm's
# count, half its tokens) separates the number of questions from the window.
control=${runs}_control
.venv/bin/herd-train -m seed=1,2,3 experiment=${arms%%,*} data.tokens_per_batch=4320 \
    ++model.init_from="$reading" trainer.enable_progress_bar=false hydra.sweep.dir=$control \
    auto_resume=true
rm -rf "$control"/*/checkpoints
.venv/bin/herd-report $control --quiet
matched=$(mktemp -d)
cp -r "$control"/*/ "$runs"/*experiment=${arms##*,}*/ "$matched"/
.venv/bin/herd-report "$matched" --quiet --claims $study/claims_reviews.yaml \
    --baseline $baseline --treatment $treatment
cp "$matched"/report.md "$control"/report_vs_2k_arm.md
rm -rf "$matched"
