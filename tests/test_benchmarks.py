"""The benchmark scripts stay runnable: each one's code path at tiny sizes on CPU (their
figures live in benchmarks/README.md, never in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def run_script(*args: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_gpu_benchmark_runs_every_measurement_on_cpu(tmp_path):
    out = tmp_path / "gpu.jsonl"
    rows = run_script("benchmarks/gpu.py", "--smoke", "--out", str(out))
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert not [row for row in rows if "error" in row]
    steps = [row for row in rows if "tokens_per_sec" in row]
    assert [row["run"] for row in steps] == [
        "herd eager, flex docs",
        "herd compiled, flex docs",
        "transformers eager, sdpa causal",
        "herd eager, sdpa causal",
    ]
    # one batch, one initialisation: every implementation starts from about ln(512) = 6.2
    assert all(5.5 < row["loss"] < 7.0 and row["tflops"] >= 0 for row in steps)
    # the flex rows run over several packed documents
    assert steps[0]["documents"] > 1
    longest = next(row for row in rows if row["run"].startswith("longest"))
    assert longest["seq_len"] == 512  # the tiny flavor's whole context fits


def test_gpu_benchmark_profiles_both_steps(tmp_path):
    out = tmp_path / "profile.txt"
    run_script("benchmarks/gpu.py", "--smoke", "--profile", "--out", str(out))
    tables = out.read_text()
    assert "== herd eager, sdpa causal, 2 steps ==" in tables
    assert "== transformers eager, sdpa causal, 2 steps ==" in tables
    assert tables.count("aten::mm") >= 2  # each step's matmuls are listed


def test_framework_benchmark_times_both_loops(tmp_path):
    rows = run_script(
        "benchmarks/framework.py",
        "--steps=2",
        "--warmup=1",
        "--rounds=1",
        "model.llama.n_layers=1",
        "model.llama.dim=64",
        "model.llama.n_heads=4",
        "model.llama.ffn_dim=128",
        "context.seq_len=64",
    )
    sides = [row for row in rows if "side" in row]
    assert [row["side"] for row in sides] == ["herd-train", "plain loop"]
    assert all(row["step_s"] > 0 for row in sides)
    # the step times are printed to 4 decimals: their ratio carries that rounding
    herd, plain = rows[-1]["herd_train_step_s"], rows[-1]["plain_loop_step_s"]
    slack = 5e-5 * (1 / plain + herd / plain**2) + 1e-4
    assert rows[-1]["overhead"] == pytest.approx(herd / plain - 1, abs=slack)
