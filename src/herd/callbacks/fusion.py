"""What the fusion model answers, in TensorBoard: each task's prompt media (image, audio or
a video's frames as a grid) beside the generated answer and the reference, after every
validation and test."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid


class FusionSamples(L.Callback):
    """`samples/answers` (a Markdown table), `samples/image_{i}`, `samples/audio_{task}_{i}`
    and `samples/video_{task}_{i}` (frames in a grid, 8 a row) for the first `per_task`
    predictions of each task."""

    def __init__(self, per_task: int = 2):
        self.per_task = per_task

    def _write(self, trainer, pl_module, split: str) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        shown: dict[str, int] = {}
        rows = ["| task | reference | answer |", "| --- | --- | --- |"]
        step = trainer.global_step
        for p in pl_module.predictions.get(split, []):
            i = shown.get(p["task"], 0)
            if i >= self.per_task:
                continue
            shown[p["task"]] = i + 1
            mark = "✓" if p["prediction"] == p["reference"] else "✗"
            rows.append(f"| {p['task']} | {p['reference']} | {p['prediction']} {mark} |")
            for logger in loggers:
                tb = logger.experiment
                if p["image"] is not None:
                    image = (p["image"].float() + 1) / 2  # [-1, 1] -> [0, 1], [C, H, W]
                    tb.add_image(f"samples/image_{i}", image.clamp(0, 1), global_step=step)
                if p.get("video") is not None:
                    frames = ((p["video"].float() + 1) / 2).clamp(0, 1)  # [F, C, H, W]
                    grid = make_grid(frames, nrow=8, pad_value=0.5)
                    tb.add_image(f"samples/video_{p['task']}_{i}", grid, global_step=step)
                if p["audio"] is not None:
                    tb.add_audio(
                        f"samples/audio_{p['task']}_{i}",
                        p["audio"][None],
                        global_step=step,
                        sample_rate=pl_module.model.speech_encoder.config.sample_rate,
                    )
        for logger in loggers:
            logger.experiment.add_text(
                f"samples/answers_{split}", "\n".join(rows), global_step=step
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")
