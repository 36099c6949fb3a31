"""TensorBoard figures for image classifiers (herd.systems.VisionSystem): a grid of held-out
images titled with their true and predicted labels, a confusion matrix, and images/s."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from herd.callbacks.throughput import StepRate


def _tensorboards(trainer) -> list:
    if trainer.sanity_checking or not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _class_names(trainer, num_classes: int) -> list[str]:
    names = list(getattr(trainer.datamodule, "class_names", None) or [])
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def prediction_grid(images: torch.Tensor, labels, preds, class_names: list[str], columns: int = 4):
    """images [B, C, S, S] in [-1, 1] -> a matplotlib figure, each image titled
    "true X / pred Y" (green when right, red when wrong)."""
    from matplotlib.figure import Figure

    n = len(images)
    rows = max(1, -(-n // columns))
    figure = Figure(figsize=(2.0 * columns, 2.2 * rows))
    pictures = ((images.float().cpu() + 1) / 2).clamp(0, 1)  # [B, C, S, S] in [0, 1]
    for i in range(rows * columns):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i >= n:
            continue
        picture = pictures[i].permute(1, 2, 0)  # [S, S, C]
        if picture.shape[-1] == 1:
            ax.imshow(picture[..., 0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(picture.numpy())
        true, pred = class_names[int(labels[i])], class_names[int(preds[i])]
        color = "green" if true == pred else "red"
        ax.set_title(f"true {true} / pred {pred}", fontsize=9, color=color)
    figure.tight_layout()
    return figure


class ImagePredictions(L.Callback):
    """After every validation: `samples/predictions`, the first `num_images` validation
    images with true and predicted labels."""

    def __init__(self, num_images: int = 16, columns: int = 4):
        self.num_images = num_images
        self.columns = columns

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        writers = _tensorboards(trainer)
        datamodule = trainer.datamodule
        if not writers or datamodule is None or not hasattr(datamodule, "sample_batch"):
            return
        batch = datamodule.sample_batch("val", self.num_images)
        preds = pl_module.predict_labels(batch["image"]).cpu()
        names = _class_names(trainer, pl_module.hparams.num_classes)
        for writer in writers:
            figure = prediction_grid(batch["image"], batch["label"], preds, names, self.columns)
            writer.add_figure("samples/predictions", figure, global_step=trainer.global_step)


class ConfusionMatrix(L.Callback):
    """`val/confusion_matrix` after every validation and `test/confusion_matrix` after
    testing, from the {"preds", "labels"} the system's eval steps return."""

    def __init__(self, normalize: str | None = None):
        self.normalize = normalize  # None (counts), "true", "pred" or "all"
        self.matrix: MulticlassConfusionMatrix | None = None
        self.last: torch.Tensor | None = None  # the last matrix computed [classes, classes]

    def _start(self, pl_module) -> None:
        self.matrix = MulticlassConfusionMatrix(
            pl_module.hparams.num_classes, normalize=self.normalize
        )

    def _update(self, outputs) -> None:
        if self.matrix is not None and isinstance(outputs, dict) and "preds" in outputs:
            self.matrix.update(outputs["preds"].cpu(), outputs["labels"].cpu())

    def _finish(self, trainer, pl_module, split: str) -> None:
        if self.matrix is None:
            return
        self.last = self.matrix.compute()
        writers = _tensorboards(trainer)
        names = _class_names(trainer, pl_module.hparams.num_classes)
        for writer in writers:
            figure, _ = self.matrix.plot(labels=names)
            figure.set_size_inches(6, 6)
            writer.add_figure(f"{split}/confusion_matrix", figure, global_step=trainer.global_step)
        self.matrix = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        self._update(outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._update(outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")


class ImageThroughput(StepRate):
    """`perf/images_per_sec` (see StepRate, which adds perf/tflops)."""

    metric = "perf/images_per_sec"

    def __init__(self, window: int = 10, image_key: str = "image", flops_every_n_steps=50):
        super().__init__(window, flops_every_n_steps)
        self.image_key = image_key

    def items(self, batch, pl_module) -> float:
        return len(batch[self.image_key])
