#!/usr/bin/env bash
# Regenerate the benchmark results: bash benchmarks/run.sh [throughput|memory|all]
#   throughput: herd (eager, compiled) vs transformers vs litgpt at the reference config
#   memory:     herd vs transformers, peak memory and step time from 1K to 32K tokens
# Each measurement runs in its own process. litgpt pins an older huggingface-hub than
# transformers 5, so it runs from a second environment, .venv-bench (created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
main=.venv/bin/python
bench=.venv-bench/bin/python
out=benchmarks/results
mkdir -p "$out"
make -s install

if [[ $what == throughput || $what == all ]]; then
    if [[ ! -x $bench ]]; then
        python3 -m venv .venv-bench
        .venv-bench/bin/pip install --quiet -e . litgpt==0.5.13
    fi
    file=$out/throughput_cpu.jsonl
    : > "$file"
    for round in 1 2; do  # two rounds, interleaved, to show run-to-run noise
        $main benchmarks/throughput.py --impl transformers --steps 3 --warmup 1 >> "$file"
        $bench benchmarks/throughput.py --impl litgpt --steps 3 --warmup 1 >> "$file"
        $main benchmarks/throughput.py --impl herd --steps 3 --warmup 1 >> "$file"
        $main benchmarks/throughput.py --impl herd --compile --steps 3 --warmup 2 >> "$file"
    done
fi

if [[ $what == memory || $what == all ]]; then
    file=$out/memory_cpu.jsonl
    : > "$file"
    for seq in 1024 2048 4096 8192; do
        for impl in transformers herd; do
            $main benchmarks/throughput.py --impl $impl --seq-len $seq --batch-size 1 --steps 1 --warmup 1 >> "$file"
        done
    done
    # herd at 8K with each activation checkpointing mode (context=8k turns on attention), two
    # interleaved rounds beside transformers
    modes=$out/memory_8k_checkpointing_cpu.jsonl
    : > "$modes"
    for round in 1 2; do
        for mode in attention selective full none; do
            $main benchmarks/throughput.py --impl herd --checkpointing $mode --seq-len 8192 \
                --batch-size 1 --steps 1 --warmup 1 >> "$modes"
        done
        $main benchmarks/throughput.py --impl transformers --seq-len 8192 --batch-size 1 --steps 1 \
            --warmup 1 >> "$modes"
    done
    # the longest contexts: herd with full activation checkpointing (a 32K step takes minutes on CPU)
    for seq in 16384 32768; do
        $main benchmarks/throughput.py --impl herd --checkpointing full --seq-len $seq --batch-size 1 \
            --steps 1 --warmup 0 >> "$file"
    done
    $main benchmarks/throughput.py --impl transformers --seq-len 16384 --batch-size 1 --steps 1 --warmup 0 >> "$file" || true
fi

$main benchmarks/tables.py
