"""Exact resume: the global random state travels in every checkpoint.

herd-train adds this callback to every run. Per-sample data randomness needs nothing here:
it is seeded by each sample's place in the training stream (herd.utils.rng).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from herd.utils.rng import global_rng_state, set_global_rng_state


class ExactResume(L.Callback):
    """Keeps the training stream of the global generators (torch CPU and CUDA, NumPy,
    Python `random`) independent of everything that is not a training step.

    The state is captured at the end of every training batch and put back at the start of
    the next one. Validation, sample generation and a resumed run's sanity check therefore
    draw without moving the stream, and a checkpoint (written after the batch, usually at the
    end of validation) holds exactly the state the next training step starts from. A resumed
    run puts it back at its first training batch, after its own sanity check.

    The checkpoint also carries the run's last fit metrics (`val/*`, `train/*`), so a run
    resumed after its last step (killed while testing) still reports them."""

    def __init__(self):
        self._state: dict | None = None
        self._trainer: L.Trainer | None = None
        self.restored_metrics: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._state = global_rng_state()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._state is not None:
            set_global_rng_state(self._state)

    def state_dict(self) -> dict:
        metrics = {}
        if self._trainer is not None:
            for key, value in self._trainer.callback_metrics.items():
                value = float(value.item() if isinstance(value, torch.Tensor) else value)
                if "/" in key and math.isfinite(value):
                    metrics[key] = value
        return {"rng": self._state, "metrics": metrics}

    def load_state_dict(self, state_dict: dict) -> None:
        self._state = state_dict.get("rng")
        self.restored_metrics = dict(state_dict.get("metrics") or {})
