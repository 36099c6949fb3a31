"""herd-plan: memory per device and step FLOPs from a composed config, on fake tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from herd.models.llama import Llama
from herd.plan import LanguageRun, main, plan
from herd.train import compose_config

from .conftest import REPO

TINY = ["experiment=language_tiny"]


def planned(tmp_path, *overrides: str):
    return plan(compose_config("train", [*TINY, *overrides], tmp_path / "cfg"))


def test_the_plan_counts_the_model_it_would_train(tmp_path):
    cfg = compose_config("train", TINY, tmp_path / "cfg")
    result = plan(cfg)
    real = LanguageRun.build(cfg).model
    assert isinstance(real, Llama)
    assert result.parameters == sum(p.numel() for p in real.parameters())
    assert result.parameters == real.config.num_params()
    assert result.step_flops == real.config.batch_flops((4, 512))
    assert result.peak >= result.weights + result.optimizer_state + result.activations


def test_checkpointing_precision_and_sharding_move_the_plan_as_they_should(tmp_path):
    by_mode = {
        mode: planned(tmp_path, f"context.activation_checkpointing={mode}")
        for mode in ("none", "selective", "attention", "full")
    }
    activations = [by_mode[m].activations for m in ("none", "selective", "attention", "full")]
    assert activations == sorted(activations, reverse=True) and activations[0] > activations[-1]
    assert len({p.weights for p in by_mode.values()}) == 1  # checkpointing keeps every weight

    # bf16 weights hold half the bytes; AdamW keeps its two moments in the weights' dtype
    fp32, bf16 = (
        by_mode["none"],
        planned(tmp_path, "precision=bf16_true", "context.activation_checkpointing=none"),
    )
    assert bf16.weights == pytest.approx(fp32.weights / 2, rel=0.01)

    single = by_mode["none"]  # context=512t checkpoints nothing
    fsdp = planned(tmp_path, "strategy=fsdp", "trainer.devices=8")
    assert fsdp.weights == pytest.approx(single.weights / 8)
    assert fsdp.optimizer_state == pytest.approx(single.optimizer_state / 8)
    assert fsdp.sharding_transient > 0 and fsdp.activations == single.activations
    zero2 = planned(tmp_path, "strategy=deepspeed", "trainer.devices=4")
    assert zero2.weights == single.weights  # stage 2 shards gradients and optimizer state only
    assert zero2.optimizer_state == pytest.approx(single.optimizer_state / 4)


@pytest.mark.slow
def test_the_plan_is_within_15_percent_of_the_memory_a_real_step_takes(tmp_path):
    """herd-train's default run (the small decoder, 8 x 512 tokens): planned peak against
    the rise of the resident set over two real optimizer steps (glibc returning freed
    blocks of 1 MB and up at once, so the resident set follows the tensors)."""
    result = plan(compose_config("train", [], tmp_path / "cfg"))
    done = subprocess.run(
        [sys.executable, "benchmarks/plan_check.py", "--measure"],
        cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])["measured"]
    assert 0.85 < result.peak / measured < 1.15, (result.peak, measured)


def test_herd_plan_prints_a_table_or_json_and_refuses_other_stages(capsys):
    assert main([*TINY, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["flavor"] == "tiny" and row["seq_len"] == 512 and row["batch_size"] == 4
    assert main([*TINY]) == 0
    assert "peak" in capsys.readouterr().out
    assert main(["experiment=vision_digits"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "herd-plan: error: herd-plan plans the language stage; model=herd.systems.VisionSystem "
        "is not one (the adapter stages train a few million parameters on frozen encoders)."
    ]
