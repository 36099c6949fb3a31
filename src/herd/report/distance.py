"""Each test answer scored within bins of how far back its evidence lies."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from herd.report.tables import (
    fmt_mean_std,
    markdown_table,
    mean_std,
    setting_label,
    short_value,
)

DISTANCE_BINS = (0, 256, 512, 1024, 2048, 4096, 8192, 32768, 131072)


def distance_bin(distance: int) -> tuple[int, str]:
    """(the bin's upper edge, its label) of an evidence distance in tokens."""
    for low, high in zip(DISTANCE_BINS, DISTANCE_BINS[1:], strict=False):
        if distance <= high:
            return high, (f"{low + 1}-{high}" if low else f"<={high}")
    return 2 * DISTANCE_BINS[-1], f">{DISTANCE_BINS[-1]}"


def score(metric: str, predictions: list[str], references: list[str]) -> float:
    """A review task's metric over some answers (as the fusion system scores them)."""
    from torchmetrics.functional.text import sacre_bleu_score, word_error_rate

    if metric == "wer":
        return float(word_error_rate(predictions, references))
    if metric.startswith("bleu"):
        return 100 * float(sacre_bleu_score(predictions, [[r] for r in references]))
    return statistics.fmean(p == r for p, r in zip(predictions, references, strict=True))


def distance_table(rows: list[dict], jobs_by_name: dict[str, dict]) -> list[dict]:
    """Per setting, task and distance bin: the task's metric on each seed's answers whose
    evidence lies in that bin -> mean, std, answers per seed. [] without predictions."""
    from herd.data.reviews import REVIEW_TASK_METRIC

    out = []
    for row in rows:
        per_seed: dict[tuple[str, str], list[float]] = {}
        counts: dict[tuple[str, str], int] = {}
        for name in row["jobs"]:
            file = jobs_by_name[name]["dir"] / "test_predictions.jsonl"
            if not file.is_file():
                continue
            groups: dict[tuple[str, str], list[dict]] = {}
            for line in file.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if record.get("task") in REVIEW_TASK_METRIC and "evidence_distance" in record:
                    key = (record["task"], distance_bin(int(record["evidence_distance"])))
                    groups.setdefault(key, []).append(record)
            for key, records in groups.items():
                metric = REVIEW_TASK_METRIC[key[0]]
                value = score(
                    metric, [r["prediction"] for r in records], [r["reference"] for r in records]
                )
                per_seed.setdefault(key, []).append(value)
                counts[key] = len(records)
        for (task, bin_name), values in sorted(per_seed.items()):
            mean, std = mean_std(values)
            out.append(
                {
                    "setting": row["setting"],
                    "task": task,
                    "metric": REVIEW_TASK_METRIC[task],
                    "bin": bin_name[1],
                    "upper": bin_name[0],
                    "mean": mean,
                    "std": std,
                    "answers": counts[(task, bin_name)],
                    "seeds": len(values),
                }
            )
    return out


def distance_markdown(table: list[dict], keys: list[str]) -> str:
    header = [
        *(keys or ["setting"]),
        "task (metric)",
        "evidence distance",
        "mean ± std",
        "answers/seed",
        "seeds",
    ]
    body = []
    for r in sorted(table, key=lambda r: (r["task"], str(r["setting"]), r["upper"])):
        setting = [short_value(r["setting"].get(k)) for k in keys] or ["."]
        body.append(
            [
                *setting,
                f"{r['task']} ({r['metric']})",
                r["bin"],
                fmt_mean_std(r["mean"], r["std"]),
                str(r["answers"]),
                str(r["seeds"]),
            ]
        )
    return markdown_table(header, body)


def plot_distance(path: Path, table: list[dict]) -> None:
    """evidence_distance.png: one panel per task, its metric against the evidence distance
    (bin upper edges, log scale), one curve per setting with seed-std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in table})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        settings = []
        for r in table:
            if r["task"] == task and r["setting"] not in settings:
                settings.append(r["setting"])
        for setting in settings:
            points = sorted(
                (r for r in table if r["task"] == task and r["setting"] == setting),
                key=lambda r: r["upper"],
            )
            ax.errorbar(
                [r["upper"] for r in points],
                [r["mean"] for r in points],
                yerr=[r["std"] or 0.0 for r in points],
                marker="o",
                capsize=3,
                label=setting_label(setting) or ".",
            )
        metric = next(r["metric"] for r in table if r["task"] == task)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{task} ({metric})")
        ax.set_xlabel("evidence distance (tokens, bin upper edge)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
