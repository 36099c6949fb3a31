"""Throughput callbacks: what is timed and what is counted."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from herd.callbacks.throughput import StepRate


class RowThroughput(StepRate):
    metric = "perf/rows_per_sec"

    def items(self, batch, pl_module) -> float:
        return len(batch)


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 4)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(96, 8), batch_size=16)


def test_a_system_without_a_flop_count_gets_its_steps_counted_by_torch(tmp_path):
    """A system without `training_flops` gets perf/tflops from FlopCounterMode on every
    second logged step here, and the rows per second times that count per row between: 16
    rows through Linear(8, 4) are 2 x 16 x 8 x 4 FLOPs forward and as many for the weight's
    gradient (the input needs none), 128 per row."""
    callback = RowThroughput(window=4, flops_every_n_steps=2)
    system = TinyRegression()
    trainer = L.Trainer(
        max_steps=7,  # the last step uncounted: its figure uses step 6's count
        log_every_n_steps=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(system)
    metrics = trainer.callback_metrics
    rows_per_sec, tflops = metrics["perf/rows_per_sec"].item(), metrics["perf/tflops"].item()
    assert tflops * 1e12 / rows_per_sec == pytest.approx(128, rel=1e-4)
    assert len(callback._times) == 4  # the counted steps (2, 4, 6) are left out of the timing
    assert system.steps_run == 7 and callback._counter is None
    assert "perf/mfu" not in metrics  # a CPU has no known peak
