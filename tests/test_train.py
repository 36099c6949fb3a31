"""Real training on CPU: the loss falls, artifacts land where the contract says, evaluation,
resume and 2-process DDP work, and bad options fail with one clear line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from herd.callbacks.layout import LAYOUT
from herd.models.llama import LlamaConfig
from herd.train import train

from .conftest import FAST, run_cli

pytestmark = pytest.mark.slow


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_short_real_training_run_learns_and_leaves_a_complete_run_dir(train_cfg):
    cfg = train_cfg(
        "trainer.max_steps=150",
        "trainer.val_check_interval=50",
        "model.optimizer.lr=1e-2",
        "model.scheduler.warmup_steps=10",
    )
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    # learnt: well below the unigram model of the same data, and far below the start (ln 4096 = 8.3)
    assert metrics["val/loss"] < metrics["val/unigram_loss"] - 0.5
    assert metrics["test/loss"] < 6.0
    assert metrics["val/ppl"] == pytest.approx(
        torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-4
    )

    # contract: metrics.json (flat stage/name keys), last.ckpt, TensorBoard events with
    # losses, lr, grad norm, throughput, text samples and an HParams session
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert all("/" in k for k in on_disk)
    # peak memory of this run: at least the weights, far below this machine's memory
    assert 0.05 < on_disk["perf/peak_memory_gb"] < 16
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size > 0
    acc, values = scalars(run_dir)
    for tag in (
        "train/loss",
        "train/lr",
        "val/loss",
        "val/ppl",
        "train/grad_norm",
        "perf/tokens_per_sec",
        "test/loss",
    ):
        assert values.get(tag), f"{tag} missing from TensorBoard"
    # achieved FLOP/s on this CPU: the tokens per second times the batch's FLOPs per token,
    # which counts attention within each packed document: above the count for one-token
    # documents, at most the count for documents as long as the row
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    vocab_size = state["model.embed_tokens.weight"].shape[0]  # the tokenizer's, not the flavor's
    llama = LlamaConfig.from_flavor(cfg.model.llama.flavor, vocab_size=vocab_size)
    seq_len = cfg.context.seq_len
    per_token = [
        f * 1e12 / t
        for f, t in zip(values["perf/tflops"], values["perf/tokens_per_sec"], strict=True)
    ]
    low, high = llama.flops_per_token(1), llama.flops_per_token(seq_len) * (1 + 1e-3)
    assert all(low < f <= high for f in per_token), (low, high, per_token)
    assert "perf/mfu" not in values  # a CPU has no known peak
    assert values["train/lr"][-1] < max(values["train/lr"])  # warmup, then cosine decay
    losses = values["train/loss"]  # single batches: compare the means of a few
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    samples = acc.Tensors("samples/text/text_summary")
    assert len(samples) == 3  # one per validation
    assert len(samples[-1].tensor_proto.string_val[0].decode()) > 100
    hparams_tags = acc.summary_metadata
    assert any(meta.plugin_data.plugin_name == "hparams" for meta in hparams_tags.values())
    # the Custom Scalars layout is written, and its loss chart finds both curves
    assert any(meta.plugin_data.plugin_name == "custom_scalars" for meta in hparams_tags.values())
    (loss_chart,) = LAYOUT["herd"]["train and validation loss"][1]
    assert {t for t in values if re.search(loss_chart, t)} == {"train/loss", "val/loss"}
    # what trained, read from the optimizer: the whole decoder, every part with gradients
    trained = json.loads((run_dir / "trained_parameters.json").read_text())
    assert trained["optimizer"] == trained["all"] == trained["gradients"]


def test_evaluate_and_resume_from_last_checkpoint(tmp_path):
    logs = tmp_path / "logs"
    first = run_cli(
        "herd.train",
        *FAST,
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
        "test=false",
        "hydra.run.dir=" + str(tmp_path / "first"),
        log_dir=logs,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert (tmp_path / "first" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "first" / "metrics.json").is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 8 and state["herd"]["system"].endswith("LanguageSystem")
    # provenance: the resolved run config, the data config and the code revision
    assert state["herd"]["config"]["trainer"]["max_steps"] == 8
    assert state["herd"]["data"]["seq_len"] == "${context.seq_len}"
    assert state["herd"]["git"] != ""

    evaluated = run_cli(
        "herd.evaluate",
        f"ckpt_path={ckpt}",  # the data config comes from the checkpoint
        "hydra.run.dir=" + str(tmp_path / "eval"),
        log_dir=logs,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"test/loss", "test/ppl"} and metrics["test/loss"] < 8.0

    resumed = run_cli(
        "herd.train",
        *FAST,
        "trainer.max_steps=12",
        "trainer.val_check_interval=4",
        "test=false",
        "trainer.log_every_n_steps=1",
        f"ckpt_path={ckpt}",
        "hydra.run.dir=" + str(tmp_path / "resumed"),
        log_dir=logs,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert state["global_step"] == 12  # continued from step 8, not from scratch
    _, values = scalars(tmp_path / "resumed")
    assert len(values["train/loss"]) == 4  # only steps 9..12 ran, one value logged per step


def test_ddp_spawn_with_two_cpu_processes(train_cfg):
    cfg = train_cfg(
        "strategy=ddp_spawn",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
    )
    metrics = train(cfg)
    state = torch.load(
        f"{cfg.paths.output_dir}/checkpoints/last.ckpt", map_location="cpu", weights_only=True
    )
    assert state["global_step"] == 4
    assert {"val/loss", "test/loss"} <= set(metrics)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["strategy=fsdp"], "herd: error: strategy=fsdp (FSDP) needs CUDA GPUs"),
        (
            ["model.llama.n_kv_heads=3"],
            "herd: error: flavor 'tiny': n_heads 4 is not divisible by n_kv_heads 3",
        ),
        (
            ["context=8k", "context.rope_scaling=null", "context.seq_len=16384"],
            "no rope_scaling is set",
        ),
        (["data.source=manifest"], "herd: error: data.source=manifest needs data.manifest=PATH"),
    ],
)
def test_bad_options_fail_with_one_clear_line(args, message, tmp_path):
    if torch.cuda.is_available() and "fsdp" in args[0]:
        pytest.skip("fsdp runs on a GPU machine")
    result = run_cli("herd.train", *FAST, *args, log_dir=tmp_path, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
