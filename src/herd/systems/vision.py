"""VisionSystem: trains and measures an image encoder on its own, as a classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from herd.errors import ConfigError
from herd.models.vision import ImageEncoder, ImageEncoderConfig
from herd.systems.common import HerdSystem, eval_mode
from herd.utils.config import plain


class VisionSystem(HerdSystem):
    """Owns training only; the architecture is `herd.models.vision.ImageEncoder` (self.model),
    which the fusion stage takes over with `VisionSystem.load_from_checkpoint(p).model`.

    The classifier head (mean of the encoder's tokens -> LayerNorm -> linear) exists for this
    stage only. Batches are {"image": [B, C, S, S], "label": [B]} (herd.data.ImageDataModule).

    Args:
        encoder: ImageEncoderConfig fields (backbone, img_size, feature_layers, ...).
        num_classes: classes of the head.
        optimizer: `_partial_` optimizer config (weight_decay applies to matrices only).
        scheduler: `_partial_` scheduler config called with (optimizer, total_steps=...).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        encoder: dict,
        num_classes: int = 10,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        encoder, optimizer, scheduler = plain(encoder), plain(optimizer), plain(scheduler)
        self.save_hyperparameters()
        self.model = ImageEncoder(ImageEncoderConfig(**encoder))
        lm_dim = self.model.config.lm_dim
        self.head = nn.Sequential(nn.LayerNorm(lm_dim), nn.Linear(lm_dim, num_classes))
        top_k = min(5, num_classes)
        self.metrics = nn.ModuleDict(
            {
                split: nn.ModuleDict(
                    {
                        "loss": MeanMetric(),
                        "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                        "top5": MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
                    }
                )
                for split in ("val", "test")
            }
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, S, S] -> class logits [B, num_classes]."""
        tokens = self.model(images)  # [B, N, lm_dim]
        return self.head(tokens.mean(dim=1))  # [B, num_classes]

    def setup(self, stage: str) -> None:
        # A size or channel mismatch would otherwise surface deep inside timm at the first batch.
        data = getattr(self.trainer, "datamodule", None) if self._trainer else None
        hp = getattr(data, "hparams", {})
        cfg = self.model.config
        for data_key, model_key in (("image_size", "img_size"), ("channels", "in_chans")):
            if data_key in hp and hp[data_key] != getattr(cfg, model_key):
                raise ConfigError(
                    f"data.{data_key}={hp[data_key]} but the encoder takes "
                    f"model.encoder.{model_key}={getattr(cfg, model_key)}; set them equal."
                )
        if "num_classes" in hp and hp["num_classes"] != self.hparams.num_classes:
            raise ConfigError(
                f"data.num_classes={hp['num_classes']} but model.num_classes="
                f"{self.hparams.num_classes}; set them equal."
            )

    # -- steps ------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: dict, split: str) -> dict:
        logits = self(batch["image"])  # [B, num_classes]
        labels = batch["label"]
        metrics = self.metrics[split]
        metrics["loss"].update(F.cross_entropy(logits, labels), weight=len(labels))
        metrics["top1"].update(logits, labels)
        metrics["top5"].update(logits, labels)
        # for callbacks (image grid, confusion matrix): what the model answered
        return {"preds": logits.argmax(dim=-1), "labels": labels}

    def _log_eval(self, split: str) -> None:
        for name, metric in self.metrics[split].items():
            self.log(f"{split}/{name}", metric.compute(), prog_bar=name == "top1")
            metric.reset()

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, S, S] -> predicted class ids [B], in eval mode."""
        with eval_mode(self):
            return self(images.to(self.device)).argmax(dim=-1)


__all__ = ["VisionSystem"]
