"""herd-plan against measured memory on CPU: one JSON line per case and allocator.

    .venv/bin/python benchmarks/plan_check.py >> benchmarks/results/plan_cpu.jsonl

For each case (herd-train overrides) the plan is computed on fake tensors; then a fresh
process builds the same decoder, optimizer and batch for real (herd.plan.LanguageRun), resets
the peak resident set after the model's inputs exist, runs the plan's two optimizer steps,
and reports how far the peak rose above the resident set before the model: the memory the
run's tensors took, as the operating system saw it. glibc's allocator keeps freed heap
blocks in the resident set, so each case runs twice: with its default settings (what a run
sees) and with a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_, freed blocks of 1 MB and up go
back at once: the tensors' own peak, which herd-plan predicts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from framework import REFERENCE_MODEL as REFERENCE  # benchmarks/framework.py

GB = 1e9
CASES = {
    "small, 8 x 512 (herd-train's default)": [],
    "reference, 4 x 1024, none": [
        *REFERENCE,
        "context=2k",
        "context.seq_len=1024",
        "data.batch_size=4",
        "context.activation_checkpointing=none",
    ],
    "reference, 1 x 8192, none": [
        *REFERENCE,
        "context=8k",
        "data.batch_size=1",
        "context.activation_checkpointing=none",
    ],
    "reference, 1 x 8192, attention (context=8k)": [*REFERENCE, "context=8k", "data.batch_size=1"],
}


def compose(overrides: list[str]):
    from herd.train import compose_config

    with tempfile.TemporaryDirectory() as tmp:
        return compose_config("train", overrides, Path(tmp))


def measure(overrides: list[str]) -> None:
    """In this process: real tensors, two optimizer steps; print the rise of the peak RSS."""
    import torch

    from herd.plan import LanguageRun
    from herd.utils.run import reset_peak_memory

    cfg = compose(overrides)
    torch.manual_seed(0)
    status = Path("/proc/self/status")
    rss = lambda key: int(status.read_text().split(key)[1].split()[0]) * 1e3  # noqa: E731
    before = rss("VmRSS:")
    reset_peak_memory(torch.device("cpu"))
    run = LanguageRun.build(cfg)
    for _ in range(2):
        for _ in range(min(int(cfg.trainer.accumulate_grad_batches), 2)):
            run.micro_batch()
        run.optimizer_step()
    print(json.dumps({"measured": rss("VmHWM:") - before}))


def main() -> None:
    from herd.plan import plan

    if sys.argv[1:2] == ["--measure"]:
        return measure(sys.argv[2:])
    for name, overrides in CASES.items():
        planned = plan(compose(overrides))
        for allocator, env in (
            ("glibc default", {}),
            ("mmap threshold 1 MB", {"MALLOC_MMAP_THRESHOLD_": "1048576"}),
        ):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", *overrides],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
            print(
                json.dumps(
                    {
                        "case": name,
                        "allocator": allocator,
                        "planned_gb": round(planned.peak / GB, 3),
                        "measured_gb": round(measured / GB, 3),
                        "planned_over_measured": round(planned.peak / measured, 3),
                        "overrides": overrides,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
