"""Markdown tables from benchmarks/results/*.jsonl (printed; paste into README.md)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> list[dict]:
    path = RESULTS / name
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )


def throughput_table(rows: list[dict]) -> str:
    by_impl = defaultdict(list)
    for r in rows:
        by_impl[r["impl"]].append(r["tokens_per_sec"])
    peers = [statistics.median(v) for k, v in by_impl.items() if not k.startswith("herd")]
    best_peer = max(peers) if peers else None
    lines = [
        "| implementation | tokens/s (each run) | median | vs. fastest peer |",
        "|---|---|---|---|",
    ]
    for impl, values in by_impl.items():
        med = statistics.median(values)
        ratio = f"{med / best_peer:.2f}x" if best_peer else "-"
        lines.append(f"| {impl} | {', '.join(f'{v:.0f}' for v in values)} | {med:.0f} | {ratio} |")
    return "\n".join(lines)


def memory_table(rows: list[dict]) -> str:
    lines = [
        "| tokens | implementation | checkpointing | peak memory (GB) | step (s) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["seq_len"], r["impl"])):
        lines.append(
            f"| {r['seq_len']} | {r['impl']} | {r['checkpointing']} | {r['peak_mem_gb']:.2f} | {r['step_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    throughput, memory = load("throughput_cpu.jsonl"), load("memory_cpu.jsonl")
    if throughput:
        print(f"### Throughput ({throughput[0]['device']}, torch {throughput[0]['torch']})\n")
        print(throughput_table(throughput) + "\n")
    if memory:
        print(f"### Memory against context length ({memory[0]['device']})\n")
        print(memory_table(memory))
    modes = load("memory_8k_checkpointing_cpu.jsonl")
    if modes:
        print(f"\n### Checkpointing modes at 8192 tokens ({modes[0]['device']})\n")
        print(memory_table(modes))
