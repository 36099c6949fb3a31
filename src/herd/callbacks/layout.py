"""TensorBoard's Custom Scalars tab for every run: train and validation loss on one chart,
the validation metrics together, the test metrics together, throughput and memory."""

from __future__ import annotations

import lightning as L

# {category: {chart title: ["Multiline", [tag regexes]]}}; regexes, so one layout serves
# every stage whatever metrics it logs.
LAYOUT = {
    "herd": {
        "train and validation loss": ["Multiline", [r"^(train|val)/loss$"]],
        "validation metrics": ["Multiline", [r"^val/(?!loss$)"]],
        "test metrics": ["Multiline", [r"^test/(?!loss$)"]],
        "learning rate and gradient norm": ["Multiline", [r"^train/(lr|grad_norm)$"]],
        "throughput": ["Multiline", [r"^perf/"]],
    }
}


class ScalarLayout(L.Callback):
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_custom_scalars"):  # TensorBoard's SummaryWriter
                experiment.add_custom_scalars(LAYOUT)
