"""Callbacks that kill the training process the hard way (SIGKILL: no cleanup, no atexit),
for the kill-and-resume tests. Added to a run with `+callbacks.crash._target_=...`."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILL this process once `step` optimiser steps have been taken."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillDuringSave(L.Callback):
    """SIGKILL this process half-way through writing its `save`-th checkpoint file."""

    def __init__(self, save: int = 2):
        self.save, self.saves = save, 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves < self.save:
            return
        import torch

        def half_write_then_die(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 half a checkpoint")  # the start of a zip, then nothing
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_write_then_die  # the process dies inside it, so no restore needed


class LossRecorder(L.Callback):
    """Append `step loss` lines to `path` after every optimiser step (flushed at once, so a
    killed run leaves what it did)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {float(loss)!r}\n")
