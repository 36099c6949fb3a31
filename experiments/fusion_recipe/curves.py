"""The learning curves of a recipe directory, as Markdown tables (from its TensorBoard events).

    python experiments/fusion_recipe/curves.py RECIPE_DIR [--every 250]

One table per stage (language, vision, speech, fusion): the training losses (train/loss, and
the fusion stage's train/speech_ctc) averaged over each `--every` steps, and every validation
metric the stage logged, at the steps it was logged.
TensorBoard shows the same curves: tensorboard --logdir RECIPE_DIR.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from herd.report.plots import read_curves

STAGES = ("language", "vision", "speech", "fusion")


def stage_table(run: Path, every: int) -> str:
    tags = {tag: dict(points) for tag, points in read_curves(run, tags=None).items()}
    train_tags = [t for t in ("train/loss", "train/speech_ctc") if t in tags]
    val_tags = sorted(t for t in tags if t.startswith("val/"))
    last = max((s for t in train_tags + val_tags for s in tags[t]), default=0)
    header = [f"{t} (window mean)" for t in train_tags] + val_tags
    rows = ["| step | " + " | ".join(header) + " |", "|---" * (1 + len(header)) + "|"]
    for end in range(every, last + every, every):
        cells = []
        for tag in train_tags + val_tags:
            hits = [v for s, v in tags[tag].items() if end - every <= s < end]
            if tag in train_tags:
                cells.append(f"{sum(hits) / len(hits):.3f}" if hits else "-")
            else:  # the last validation in the window
                cells.append(f"{hits[-1]:.3f}" if hits else "")
        rows.append(f"| {end} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe_dir", type=Path)
    parser.add_argument("--every", type=int, default=250, help="steps per row")
    args = parser.parse_args()
    for stage in STAGES:
        run = args.recipe_dir / stage
        if run.is_dir():
            print(f"\n**{stage}** ({run})\n\n{stage_table(run, args.every)}")


if __name__ == "__main__":
    main()
