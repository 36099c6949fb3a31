"""What to do when a step's gradients are NaN or infinite (a non-finite loss makes them so)."""

from __future__ import annotations

import logging

import lightning as L
import torch

from herd.errors import ConfigError, HerdError

log = logging.getLogger(__name__)
POLICIES = ("skip", "stop")


class NonFiniteLossError(HerdError, FloatingPointError):
    """Training stopped on a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """`skip`: drop the step's gradients (the optimiser leaves every parameter as it was),
    count it in `train/skipped_steps`, and stop anyway after `max_skipped` in a row; `stop`:
    stop at once. Either way no checkpoint is written from the bad state, so the last good
    one stays `last.ckpt`.

    Under fp16 mixed precision the gradient scaler already skips overflowing steps; this
    guard then only sees what survives unscaling."""

    def __init__(self, policy: str = "skip", max_skipped: int = 10):
        if policy not in POLICIES:
            raise ConfigError(
                f"callbacks.nonfinite.policy={policy!r} is not one of {list(POLICIES)}."
            )
        self.policy, self.max_skipped = policy, max_skipped
        self.skipped = 0  # total, logged
        self._in_a_row = 0

    def _bad(self, trainer: L.Trainer, what: str) -> None:
        step = trainer.global_step
        if self.policy == "stop" or self._in_a_row >= self.max_skipped:
            why = "" if self.policy == "stop" else f" ({self._in_a_row} steps skipped in a row)"
            raise NonFiniteLossError(
                f"Non-finite {what} at step {step}{why}; training stopped and the last good "
                "checkpoint was kept. Lower the learning rate or use precision=fp32/bf16_mixed, "
                "then resume with ckpt_path=last."
            )
        self.skipped += 1
        self._in_a_row += 1
        log.warning("Non-finite %s at step %d: step skipped (%d so far).", what, step, self.skipped)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if torch.isfinite(norm):
            self._in_a_row = 0
            return
        self._bad(trainer, "loss or gradients")
        for p in pl_module.parameters():
            p.grad = None  # optimisers skip parameters without gradients: no update, no moments

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
