"""What herd-train costs on top of its model: a herd-train language run against a plain
PyTorch loop over the same model, data, loss, optimizer, scheduler and clipping.

    .venv/bin/python benchmarks/framework.py [--steps 12] [--rounds 2] [override ...]

Each side is timed the same way: wall clock from one training batch's start to the next, so
a step holds everything the loop does (the next batch's loading; forward, backward,
clipping, optimizer and scheduler; on herd's side Lightning's loop, every callback, the
loggers and the throughput timer). Median over the steps after `--warmup`; the sides
alternate for `--rounds` rounds. Prints one JSON line per side and round, then the ratio.
Defaults to the reference configuration of benchmarks/README.md: dim 512, 8 layers, 8
heads, 2 KV heads, FFN 1536, vocab 32000, 1024 tokens, batch 4, fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import open_dict

from herd.systems.common import build_optimization
from herd.train import compose_config, train

# the reference decoder of benchmarks/README.md (also planned by plan_check.py)
REFERENCE_MODEL = [
    "model.llama.dim=512",
    "model.llama.n_layers=8",
    "model.llama.n_heads=8",
    "model.llama.n_kv_heads=2",
    "model.llama.ffn_dim=1536",
    "model.llama.vocab_size=32000",
]
REFERENCE = [
    *REFERENCE_MODEL,
    "context.seq_len=1024",
    "data.batch_size=4",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "test=false",
]

STEP_STARTS: list[float] = []  # filled by StepClock during the herd-train run


class StepClock(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        STEP_STARTS.append(time.perf_counter())


def herd_train_steps(cfg) -> list[float]:
    with open_dict(cfg):
        cfg.callbacks.step_clock = {"_target_": "__main__.StepClock"}
    STEP_STARTS.clear()
    train(cfg)
    return [b - a for a, b in zip(STEP_STARTS, STEP_STARTS[1:], strict=False)]


def plain_loop_steps(cfg) -> list[float]:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    system = hydra.utils.instantiate(cfg.model, _recursive_=False)
    system.configure_model()
    datamodule.setup("fit")
    steps = cfg.trainer.max_steps
    optimization = build_optimization(
        system,
        system.hparams.optimizer,
        system.hparams.scheduler,
        system.lr_multipliers(),
        total_steps=steps,
    )
    optimizer = optimization["optimizer"]
    scheduler = optimization["lr_scheduler"]["scheduler"]
    params = [p for p in system.parameters() if p.requires_grad]
    system.train()
    starts = []
    for batch in datamodule.train_dataloader():
        starts.append(time.perf_counter())
        if len(starts) > steps:
            break
        loss, _ = system.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="Hydra overrides after the reference ones")
    args = p.parse_args()
    overrides = [*REFERENCE, f"trainer.max_steps={args.warmup + args.steps}", *args.overrides]
    medians = {"herd-train": [], "plain loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for side, run in (("herd-train", herd_train_steps), ("plain loop", plain_loop_steps)):
                cfg = compose_config(
                    "train", overrides, Path(tmp) / f"{side}_{round_}".replace(" ", "_")
                )
                step_s = statistics.median(run(cfg)[args.warmup :])
                medians[side].append(step_s)
                print(json.dumps({"side": side, "round": round_, "step_s": round(step_s, 4)}))
    herd, plain = (statistics.median(medians[s]) for s in ("herd-train", "plain loop"))
    print(
        json.dumps(
            {
                "herd_train_step_s": round(herd, 4),
                "plain_loop_step_s": round(plain, 4),
                "overhead": round(herd / plain - 1, 4),
                "overrides": overrides,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
