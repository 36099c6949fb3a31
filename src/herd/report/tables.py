"""The settings table: jobs grouped by setting, mean ± std per metric, as Markdown and CSV;
the trained-parameters table."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from herd.callbacks.trained_parameters import cell, read_summary


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def metric_order(names) -> list[str]:
    """test/ first, then val/, then the rest, each alphabetical."""
    rank = {"test": 0, "val": 1}
    return sorted(set(names), key=lambda n: (rank.get(n.split("/")[0], 2), n))


def settings_table(jobs: list[dict], keys: list[str]) -> list[dict]:
    """One row per setting of `keys` over the jobs with metrics: the setting, its jobs and
    seeds, n, and per metric the mean and std over the setting's jobs."""
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        if job["metrics"] is not None:
            setting = tuple(job["overrides"].get(k) for k in keys)
            groups.setdefault(setting, []).append(job)
    rows = []
    for setting, members in groups.items():
        names = metric_order(n for job in members for n in job["metrics"])
        row = {
            "setting": dict(zip(keys, setting, strict=True)),
            "jobs": [job["name"] for job in members],
            "seeds": [job["seed"] for job in members],
            "n": len(members),
            "metrics": {},
        }
        for name in names:
            values = [job["metrics"][name] for job in members if name in job["metrics"]]
            row["metrics"][name] = (*mean_std(values), len(values))
        rows.append(row)
    return rows


def fmt_number(value: float | None) -> str:
    """A metric value in 4 significant digits ('' for None)."""
    return "" if value is None else f"{value:.4g}"


def fmt_mean_std(mean: float, std: float | None) -> str:
    """'mean ± std', or the mean alone for a single seed."""
    return fmt_number(mean) if std is None else f"{fmt_number(mean)} ± {fmt_number(std)}"


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def settings_markdown(rows: list[dict], keys: list[str], metrics: list[str]) -> str:
    """The settings table: swept keys, n, seeds, one 'mean ± std' column per metric."""
    header = [*keys, "n", "seeds", *metrics, "jobs"]
    body = []
    for row in rows:
        cells = [str(row["setting"][k]) if row["setting"][k] is not None else "" for k in keys]
        cells += [str(row["n"]), ",".join(str(s) for s in row["seeds"])]
        for name in metrics:
            mean, std, _ = row["metrics"].get(name, (None, None, 0))
            cells.append("" if mean is None else fmt_mean_std(mean, std))
        # a job's directory is its number and settings; the columns already show the settings
        cells.append(", ".join(name.split("_", 1)[0] for name in row["jobs"]))
        body.append(cells)
    return markdown_table(header, body)


def write_csv(path: Path, rows: list[dict], keys: list[str], metrics: list[str]) -> None:
    """report.csv: one row per setting; numbers unrounded, std empty for a single seed."""
    header = [*keys, "n", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std")), "jobs"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            cells = [row["setting"][k] or "" for k in keys]
            cells += [row["n"], " ".join(str(s) for s in row["seeds"])]
            for name in metrics:
                mean, std, _ = row["metrics"].get(name, (None, None, 0))
                cells += ["" if mean is None else mean, "" if std is None else std]
            cells.append(" ".join(row["jobs"]))
            writer.writerow(cells)


def short_value(value) -> str:
    """A setting's value for a plot: long decimals (Optuna's learning rates) to 4 digits."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return text if len(text) <= 8 else f"{number:.4g}"


def setting_label(setting: dict, sep: str = " ") -> str:
    """A setting as short legend text (`all jobs` when nothing was swept)."""
    return sep.join(f"{k}={short_value(v)}" for k, v in setting.items()) or "all jobs"


def trained_parameters_table(rows: list[dict], jobs_by_name: dict[str, dict]) -> str | None:
    """Per setting, the parameters each module part had in the optimizer and that received
    a gradient during training (trained_parameters.json, written by TrainedParameters):
    'gradients / optimizer', '—' for a part the optimizer did not hold. None when no job
    recorded it. A setting whose seeds disagree says so instead of hiding it."""
    summaries = {}
    for row in rows:
        found = [read_summary(jobs_by_name[name]["dir"]) for name in row["jobs"]]
        found = [f for f in found if f is not None]
        if found:
            key = setting_label(row["setting"])
            sides = ("optimizer", "optimizer_layers", "gradients", "gradients_layers")
            same = all([f.get(k) for k in sides] == [found[0].get(k) for k in sides] for f in found)
            summaries[key] = (found[0], same, len(found))
    if not summaries:
        return None
    parts = list(dict.fromkeys(p for s, _, _ in summaries.values() for p in s["all"]))
    header = ["part", "parameters", *summaries]
    body = []
    for part in parts:
        total = next(s["all"][part] for s, _, _ in summaries.values() if part in s["all"])
        cells = [part, f"{total:,}"]
        for summary, _, _ in summaries.values():
            in_opt = cell(summary, part, "optimizer")
            cells.append(
                in_opt if in_opt == "—" else f"{cell(summary, part, 'gradients')} / {in_opt}"
            )
        body.append(cells)
    body.append(
        ["total trained", ""]
        + [
            f"{s.get('gradients_total', 0):,} / {s['optimizer_total']:,}"
            for s, _, _ in summaries.values()
        ]
    )
    body.append(
        ["seeds agree", ""]
        + [f"{'yes' if same else 'NO'} ({n} jobs)" for _, same, n in summaries.values()]
    )
    return markdown_table(header, body)
