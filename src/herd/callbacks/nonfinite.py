"""What to do when a step's gradients are NaN or infinite (a non-finite loss makes them so),
or when one batch does not fit in memory."""

from __future__ import annotations

import functools
import logging

import lightning as L
import torch

from herd.errors import ConfigError, HerdError
from herd.systems.common import step_grad_norm

log = logging.getLogger(__name__)
POLICIES = ("skip", "stop")


class NonFiniteLossError(HerdError, FloatingPointError):
    """Training stopped on a non-finite loss or gradient."""


class OutOfMemoryStop(HerdError, MemoryError):
    """Training stopped on a batch that did not fit in memory."""


class NonFiniteGuard(L.Callback):
    """`skip`: drop the step's gradients (the optimiser leaves every parameter as it was),
    count it in `train/skipped_steps`, and stop anyway after `max_skipped` in a row; `stop`:
    stop at once. Either way no checkpoint is written from the bad state, so the last good
    one stays `last.ckpt`.

    A batch that runs out of memory (torch.OutOfMemoryError in the forward or backward pass,
    e.g. an unusually long sample) follows the same policy: skipped and counted in
    `train/skipped_oom`, or the run stops with a message saying what to lower.

    Under fp16 mixed precision the gradient scaler already skips overflowing steps; this
    guard then only sees what survives unscaling."""

    def __init__(self, policy: str = "skip", max_skipped: int = 10):
        if policy not in POLICIES:
            raise ConfigError(
                f"callbacks.nonfinite.policy={policy!r} is not one of {list(POLICIES)}."
            )
        self.policy, self.max_skipped = policy, max_skipped
        self.skipped = 0  # total, logged
        self.skipped_oom = 0  # batches that did not fit, logged
        self._in_a_row = 0

    # counts travel in checkpoints, so a resumed run logs the totals of the whole run
    def state_dict(self) -> dict:
        return {
            "skipped": self.skipped,
            "skipped_oom": self.skipped_oom,
            "in_a_row": self._in_a_row,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.skipped_oom = state_dict.get("skipped_oom", 0)
        self._in_a_row = state_dict.get("in_a_row", 0)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or "training_step" in vars(pl_module):
            return
        # Lightning calls these by attribute, so instance attributes wrap them for this fit
        step, backward = pl_module.training_step, pl_module.backward

        @functools.wraps(step)
        def training_step(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            except torch.OutOfMemoryError:
                pass  # leaving the except block frees the failed pass's tensors
            self._out_of_memory(trainer, pl_module, "forward pass")
            return None  # Lightning skips the backward pass and updates nothing

        @functools.wraps(backward)
        def guarded_backward(*args, **kwargs):
            try:
                return backward(*args, **kwargs)
            except torch.OutOfMemoryError:
                pass
            self._out_of_memory(trainer, pl_module, "backward pass")
            for p in pl_module.parameters():
                p.grad = None  # a partial backward's gradients must not be applied

        pl_module.training_step, pl_module.backward = training_step, guarded_backward

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            for name in ("training_step", "backward"):
                vars(pl_module).pop(name, None)

    def _out_of_memory(self, trainer: L.Trainer, pl_module, where: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        step = trainer.global_step
        why = self._stop_reason()
        if why is not None:
            raise OutOfMemoryStop(
                f"Out of memory in the {where} of step {step}{why}; training stopped and the "
                "last checkpoint was kept. Lower data.batch_size (or the context length, or use "
                "model.activation_checkpointing), or skip such batches with "
                "callbacks.nonfinite.policy=skip, then resume with ckpt_path=last."
            )
        self.skipped_oom += 1
        self._in_a_row += 1
        log.warning(
            "Out of memory in the %s of step %d: batch skipped (%d so far).",
            where,
            step,
            self.skipped_oom,
        )

    def _stop_reason(self) -> str | None:
        """None when this step may be skipped; else why the run stops ('' for policy=stop)."""
        if self.policy == "stop":
            return ""
        if self._in_a_row >= self.max_skipped:
            return f" ({self._in_a_row} steps skipped in a row)"
        return None

    def _bad(self, trainer: L.Trainer, what: str) -> None:
        step = trainer.global_step
        why = self._stop_reason()
        if why is not None:
            raise NonFiniteLossError(
                f"Non-finite {what} at step {step}{why}; training stopped and the last good "
                "checkpoint was kept. Lower the learning rate or use precision=fp32/bf16_mixed, "
                "then resume with ckpt_path=last."
            )
        self.skipped += 1
        self._in_a_row += 1
        log.warning("Non-finite %s at step %d: step skipped (%d so far).", what, step, self.skipped)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        norm = step_grad_norm(pl_module)
        if torch.isfinite(norm):
            self._in_a_row = 0
            return
        self._bad(trainer, "loss or gradients")
        for p in pl_module.parameters():
            p.grad = None  # optimisers skip parameters without gradients: no update, no moments

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        pl_module.log("train/skipped_oom", float(self.skipped_oom), on_step=True, on_epoch=False)
