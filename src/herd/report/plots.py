"""loss_curves.png and metrics.png."""

from __future__ import annotations

import math
from pathlib import Path

from herd.report.tables import setting_label, short_value

# TensorBoard scalar tags drawn in loss_curves.png, one panel each, when any job logged them.
CURVE_TAGS = ("train/loss", "val/loss")
# Metric prefixes drawn in metrics.png (final evaluation numbers, not training statistics).
BAR_PREFIXES = ("test/", "val/")


def read_curves(job_dir: Path, tags=CURVE_TAGS) -> dict[str, list[tuple[int, float]]]:
    """The job's TensorBoard scalars for `tags` (None: every tag) as {tag: [(step, value)]},
    from every directory of the job holding event files (later files win on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({p.parent for p in job_dir.rglob("events.out.tfevents*")})
    curves: dict[str, dict[int, float]] = {}
    for event_dir in event_dirs:
        accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception:  # a truncated event file (killed job) must not stop the report
            continue
        logged = accumulator.Tags().get("scalars", [])
        for tag in logged if tags is None else tags:
            if tag in logged:
                for event in accumulator.Scalars(tag):
                    curves.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot_loss_curves(path: Path, rows: list[dict], jobs_by_name: dict[str, dict]) -> bool:
    """loss_curves.png: one panel per tag with curves, one line per job, one colour per
    setting. False (no file) when no job logged a loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: read_curves(job["dir"]) for name, job in jobs_by_name.items()}
    tags = [tag for tag in CURVE_TAGS if any(tag in c for c in curves.values())]
    if not tags:
        return False
    fig, axes = plt.subplots(1, len(tags), figsize=(6 * len(tags), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes[0], tags, strict=True):
        for index, row in enumerate(rows):
            colour = colours[index % len(colours)]
            label = setting_label(row["setting"])
            for job_name in row["jobs"]:
                points = curves[job_name].get(tag)
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, color=colour, alpha=0.8, label=label, marker=".")
                    label = None  # one legend entry per setting, not per seed
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_metric_bars(path: Path, rows: list[dict], metrics: list[str]) -> bool:
    """metrics.png: one bar chart per final test/ or val/ metric, one bar per setting with
    the std over seeds as error bar. False (no file) when there is no such metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m.startswith(BAR_PREFIXES)]
    if not shown:
        return False
    columns = min(3, len(shown))
    lines = math.ceil(len(shown) / columns)
    width = max(4.0, 0.8 * len(rows) + 2)
    fig, axes = plt.subplots(lines, columns, figsize=(width * columns, 3.5 * lines), squeeze=False)
    keys = list(rows[0]["setting"])
    if len(keys) == 1:  # the key once as the axis title, the values under the bars
        labels = [short_value(row["setting"][keys[0]]) for row in rows]
    else:
        labels = [setting_label(row["setting"], sep="\n") for row in rows]
    for ax, metric in zip(axes.flat, shown, strict=False):
        means = [row["metrics"].get(metric, (math.nan, None, 0))[0] for row in rows]
        stds = [row["metrics"].get(metric, (math.nan, None, 0))[1] or 0.0 for row in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize="small")
        ax.set_title(metric)
        ax.set_xlabel(keys[0] if len(keys) == 1 else "")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
