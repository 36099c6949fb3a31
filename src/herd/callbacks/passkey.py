"""Passkey retrieval / needle-in-a-haystack over a grid of lengths x depths, run at test time.

Logs `test/passkey_acc@{length}` (mean over depths) and `test/passkey_acc` (mean over the
grid), draws the accuracy heatmap into TensorBoard (`test/passkey_heatmap`) and saves it as
`passkey_heatmap.png` in the run directory.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from herd.data.passkey import make_passkey_sample
from herd.errors import ConfigError
from herd.models.llama import generate
from herd.systems.common import eval_mode

log = logging.getLogger(__name__)
ANSWER_ROOM = 8  # tokens kept free for the five-digit answer (however it tokenises) and a stop


@torch.no_grad()
def passkey_accuracy(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    samples_per_cell: int = 5,
    filler_texts: list[str] | None = None,
    seed: int = 0,
) -> dict[tuple[int, float], float]:
    """Greedy-decoding exact-match accuracy of the key for every (length, depth) cell."""
    with eval_mode(model):
        device = next(model.parameters()).device
        rng = random.Random(seed)
        grid = {}
        for length in lengths:
            for depth in depths:
                correct = 0
                for _ in range(samples_per_cell):
                    # The prompt leaves room for the answer inside `length` (the model's context).
                    sample = make_passkey_sample(
                        tokenizer, length - ANSWER_ROOM, depth, rng, filler_texts
                    )
                    prompt = torch.tensor([sample.tokens], device=device)
                    out = generate(model, prompt, max_new_tokens=ANSWER_ROOM)
                    correct += tokenizer.decode(out[0, len(sample.tokens) :].tolist()).startswith(
                        sample.answer
                    )
                grid[(length, depth)] = correct / samples_per_cell
    return grid


def heatmap_figure(grid: dict[tuple[int, float], float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({k[0] for k in grid})
    depths = sorted({k[1] for k in grid})
    values = [[grid[(n, d)] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    return fig


class PasskeyRetrieval(L.Callback):
    def __init__(
        self,
        lengths: list[int],
        depths: list[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        samples_per_cell: int = 5,
        filler: str = "passkey",  # "passkey" (repeated sentences) or "needle" (held-out prose)
        seed: int = 0,
    ):
        if filler not in ("passkey", "needle"):
            raise ConfigError(f"filler={filler!r} is unknown; use 'passkey' or 'needle'.")
        self.lengths, self.depths = list(lengths), list(depths)
        self.samples_per_cell, self.filler, self.seed = samples_per_cell, filler, seed
        self.grid: dict[tuple[int, float], float] = {}

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        limit = pl_module.model.config.max_seq_len
        lengths = [n for n in self.lengths if n <= limit]
        if len(lengths) < len(self.lengths):
            log.warning("Passkey lengths above the model's context (%d) are skipped.", limit)
        if not lengths:
            return
        filler = None
        if self.filler == "needle":
            docs = trainer.datamodule.documents.get("test") or trainer.datamodule.documents["val"]
            filler = [pl_module.tokenizer.decode(d) for d in docs]
        self.grid = passkey_accuracy(
            pl_module.model,
            pl_module.tokenizer,
            lengths,
            self.depths,
            self.samples_per_cell,
            filler,
            self.seed,
        )
        for n in lengths:
            cells = [self.grid[(n, d)] for d in self.depths]
            pl_module.log(f"test/passkey_acc@{n}", sum(cells) / len(cells))
        pl_module.log("test/passkey_acc", sum(self.grid.values()) / len(self.grid))
        if trainer.is_global_zero:
            self._draw(trainer)

    def _draw(self, trainer) -> None:
        import matplotlib.pyplot as plt

        fig = heatmap_figure(self.grid, f"{self.filler} retrieval, step {trainer.global_step}")
        fig.savefig(Path(trainer.default_root_dir) / "passkey_heatmap.png", dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "test/passkey_heatmap", fig, global_step=trainer.global_step
                )
        plt.close(fig)
