"""Staged context extension: logs the current context length (`train/context_len`) of the
packed text stream (TextDataModule(context_stages=...)) or of the review documents
(ReviewDataModule(context_stages=...))."""

from __future__ import annotations

import lightning as L


class ContextSchedule(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        datamodule = trainer.datamodule
        stream = getattr(datamodule, "train_stream", None)
        if stream is None and getattr(datamodule, "hparams", {}).get("context_stages"):
            stream = datamodule  # ReviewDataModule.seq_len_at
        if stream is not None:
            seq_len = stream.seq_len_at(trainer.global_step * trainer.accumulate_grad_batches)
            pl_module.log("train/context_len", float(seq_len), on_step=True, on_epoch=False)
