"""herd-report MULTIRUN_DIR: one table of a sweep's settings and final metrics, with plots.

    herd-report logs/train/multiruns/2026-11-26_10-00-00
    herd-report experiments/context_ablation/runs --claims experiments/context_ablation/claims.yaml
    herd-report DIR --claims claims.yaml --baseline context=512t --treatment context=8k

Every job directory below MULTIRUN_DIR (one holding `.hydra/`) is read: its overrides
(`.hydra/overrides.yaml`), resolved config (`.hydra/config.yaml`), `metrics.json` and
TensorBoard events. Jobs with the same overrides apart from `seed` form one setting; the
override keys that differ between jobs are the table's columns, and each metric is the
mean ± sample std over the setting's seeds. Written into MULTIRUN_DIR:

    report.md          settings table, missing or failed jobs, claims table, git revision, machine
    report.csv         the same table, one row per setting, `<metric> mean` and `<metric> std`
    loss_curves.png    train/loss (and val/loss) of every job against the step, one colour per setting
    metrics.png        bars of the final test/ and val/ metrics per setting, std as error bars

A partial sweep is fine: jobs without metrics.json, and jobs that Hydra's multirun.yaml lists
but that never started, are named in "Missing or failed jobs" with the error line of their log.

`--claims FILE` compares a paper's claimed relative changes with the measured ones:

    test/bleu:
      claimed_relative_change: 0.15        # +15 %
      baseline: {context: 8k}              # override key=value pairs that select the jobs
      treatment: {context: 128k}

The measured change is (treatment - baseline) / |baseline| of the means over every job that
matches the selector and has the metric (all seeds, and all settings of other swept keys).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import statistics
import sys
from pathlib import Path

import yaml

from herd.callbacks.trained_parameters import read_summary
from herd.errors import ConfigError

# The override key that names a repetition, not a setting.
SEED_KEY = "seed"
# TensorBoard scalar tags drawn in loss_curves.png, one panel each, when any job logged them.
CURVE_TAGS = ("train/loss", "val/loss")
# Metric prefixes drawn in metrics.png (final evaluation numbers, not training statistics).
BAR_PREFIXES = ("test/", "val/")
# A log line worth quoting for a failed job.
ERROR_LINE = re.compile(r"herd: error:|Error")


# --------------------------------------------------------------------------- collecting jobs


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`key=value` override strings as {key: value}; `+`/`++` prefixes dropped, deletions
    (`~key`) and bare flags ignored."""
    settings = {}
    for override in overrides or []:
        if "=" not in override or override.startswith("~"):
            continue
        key, value = override.split("=", 1)
        settings[key.lstrip("+")] = value
    return settings


def read_yaml(path: Path):
    """A YAML file's content, or None when the file is missing or unreadable."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def error_line(job_dir: Path) -> str | None:
    """The last line of the job's `*.log` files that reports an error, or None."""
    found = None
    for log_file in sorted(job_dir.glob("*.log")):
        try:
            lines = log_file.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if ERROR_LINE.search(line):
                found = line.strip()
    return found


def read_job(root: Path, job_dir: Path) -> dict:
    """One job: its directory (relative to root), overrides, resolved config, metrics (None
    when metrics.json is missing or unreadable) and seed."""
    overrides = parse_overrides(read_yaml(job_dir / ".hydra" / "overrides.yaml") or [])
    config = read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    metrics = None
    metrics_file = job_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            metrics = None
    seed = overrides.get(SEED_KEY, config.get(SEED_KEY) if isinstance(config, dict) else None)
    return {
        "name": str(job_dir.relative_to(root)) if job_dir != root else ".",
        "dir": job_dir,
        "overrides": overrides,
        "config": config if isinstance(config, dict) else {},
        "metrics": metrics,
        "seed": seed,
    }


def find_jobs(root: Path) -> list[dict]:
    """Every job directory below root (a directory holding `.hydra/`), in path order."""
    job_dirs = sorted({hydra_dir.parent for hydra_dir in root.rglob(".hydra")})
    return [read_job(root, job_dir) for job_dir in job_dirs]


def never_started(root: Path, jobs: list[dict]) -> list[str]:
    """The jobs that root's multirun.yaml lists but that have no directory: a sweep cut short.

    Only Hydra's basic sweeper enumerates its jobs in advance (the job number starts the
    subdir); for other sweepers (Optuna) nothing is reported here."""
    multirun = read_yaml(root / "multirun.yaml")
    hydra_cfg = (multirun or {}).get("hydra") or {}
    sweeper = str((hydra_cfg.get("sweeper") or {}).get("_target_", ""))
    subdir = str(hydra_cfg.get("sweep", {}).get("subdir") or "${hydra.job.num}")
    if not sweeper.endswith("BasicSweeper") or not subdir.startswith(
        ("${hydra.job.num}", "${herd_job_name:${hydra.job.num}")
    ):
        return []
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    task += [f"{k}={v}" for k, v in ((hydra_cfg.get("sweeper") or {}).get("params") or {}).items()]
    try:
        parsed = OverridesParser.create().parse_overrides(task)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except Exception:  # an unparsable listing must not stop the report
        return []
    planned = [job for batch in batches for job in batch]
    present = {job["name"].split("_", 1)[0] for job in jobs}  # "3" or "3_context=2k,..."
    return [
        f"{num} ({' '.join(overrides)})"
        for num, overrides in enumerate(planned)
        if str(num) not in present
    ]


# --------------------------------------------------------------------------- the table


def swept_keys(jobs: list[dict]) -> list[str]:
    """The override keys whose values differ between jobs (or are absent in some), in the
    order they first appear; the seed is a repetition, not a setting."""
    keys = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    return [
        key
        for key in keys
        if key != SEED_KEY and len({job["overrides"].get(key) for job in jobs}) > 1
    ]


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
            same = all(
                (f["optimizer"], f["gradients"]) == (found[0]["optimizer"], found[0]["gradients"])
                for f in found
            )
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
            in_opt = summary["optimizer"].get(part)
            got = (summary["gradients"] or {}).get(part)
            cells.append("—" if not in_opt else f"{got or 0:,} / {in_opt:,}")
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


# --------------------------------------------------------------------------- claims


def parse_selector(items: list[str] | None) -> dict[str, str] | None:
    """`key=value` command-line pairs as a selector, or None when none were given."""
    if not items:
        return None
    bad = [item for item in items if "=" not in item]
    if bad:
        raise ConfigError(f"Selector {bad[0]!r} is not key=value (e.g. --baseline context=8k).")
    return dict(item.split("=", 1) for item in items)


def load_claims(path: Path) -> dict[str, dict]:
    """The claims file: {metric: {claimed_relative_change, baseline, treatment}}, checked."""
    if not path.is_file():
        raise ConfigError(f"Claims file {path} does not exist.")
    try:
        claims = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"Claims file {path} is not valid YAML: {exc}") from None
    if not isinstance(claims, dict) or not claims:
        raise ConfigError(f"Claims file {path} must map metric names to claims.")
    for metric, claim in claims.items():
        needed = ("claimed_relative_change", "baseline", "treatment")
        if not isinstance(claim, dict) or any(k not in claim for k in needed):
            raise ConfigError(
                f"Claim {metric!r} in {path} needs claimed_relative_change, baseline and "
                "treatment (e.g. baseline: {context: 8k})."
            )
    return claims


def config_value(config: dict, dotted_key: str):
    """The value at a dotted key of a nested config dict, or None."""
    node = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def same_value(measured, wanted) -> bool:
    """Whether a job's setting equals a selector's value: as text, or as numbers (1e-3 == 0.001)."""
    if measured is None:
        return False
    if str(measured) == str(wanted):
        return True
    try:
        return math.isclose(float(measured), float(wanted), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def matches(job: dict, selector: dict) -> bool:
    """Whether a job has every key=value of the selector, as an override or, for keys it did
    not override, in its resolved config."""
    for key, wanted in selector.items():
        value = job["overrides"].get(key)
        if value is None:
            value = config_value(job["config"], key)
        if not same_value(value, wanted):
            return False
    return True


def selector_text(selector: dict) -> str:
    """A selector as `key=value` text."""
    return " ".join(f"{k}={v}" for k, v in selector.items())


def claims_rows(claims: dict, jobs: list[dict], baseline=None, treatment=None) -> list[dict]:
    """Per claimed metric: the claimed and the measured relative change (None when either
    side has no job with the metric). `baseline`/`treatment` replace the file's selectors."""
    rows = []
    for metric, claim in claims.items():
        sides = {}
        for side, override in (("baseline", baseline), ("treatment", treatment)):
            selector = override or claim[side]
            values = [
                job["metrics"][metric]
                for job in jobs
                if job["metrics"] and metric in job["metrics"] and matches(job, selector)
            ]
            mean, std = mean_std(values) if values else (None, None)
            sides[side] = (selector, mean, len(values), std)
        base, treat = sides["baseline"][1], sides["treatment"][1]
        measured = (
            (treat - base) / abs(base) if base not in (None, 0) and treat is not None else None
        )
        # how far apart the two sides are in seed standard deviations (the larger of the
        # two sides' sample stds; None without two seeds on each side)
        stds = [sides[side][3] for side in sides]
        separation = None
        if base is not None and treat is not None and None not in stds:
            spread = max(stds)
            separation = math.inf if spread == 0 and treat != base else None
            if spread > 0:
                separation = abs(treat - base) / spread
        rows.append(
            {
                "metric": metric,
                "claimed": float(claim["claimed_relative_change"]),
                "measured": measured,
                "separation": separation,
                **{side: sides[side] for side in sides},
            }
        )
    return rows


def fmt_percent(value: float | None) -> str:
    """A relative change as a signed percentage ('not measured' for None)."""
    return "not measured" if value is None else f"{100 * value:+.1f}%"


def claims_markdown(rows: list[dict]) -> str:
    """The "Claimed vs measured" table."""
    header = ["metric", "baseline", "treatment", "baseline (n)", "treatment (n)"]
    header += ["claimed change", "measured change", "same direction", "gap / seed std"]
    body = []
    for row in rows:
        (base_sel, base, base_n, base_std) = row["baseline"]
        (treat_sel, treat, treat_n, treat_std) = row["treatment"]
        direction = ""
        if row["measured"] is not None and row["claimed"] != 0:  # 0: no change is claimed
            direction = "yes" if row["measured"] * row["claimed"] > 0 else "no"
        separation = row["separation"]
        body.append(
            [
                row["metric"],
                selector_text(base_sel),
                selector_text(treat_sel),
                f"{fmt_side(base, base_std)} ({base_n})",
                f"{fmt_side(treat, treat_std)} ({treat_n})",
                fmt_percent(row["claimed"]),
                fmt_percent(row["measured"]),
                direction,
                "" if separation is None else f"{separation:.1f}",
            ]
        )
    return markdown_table(header, body)


def fmt_side(mean: float | None, std: float | None) -> str:
    return fmt_number(mean) if mean is None else fmt_mean_std(mean, std)


# --------------------------------------------------------------------------- plots


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


def read_curves(job_dir: Path, tags=CURVE_TAGS) -> dict[str, list[tuple[int, float]]]:
    """The job's TensorBoard scalars for `tags` as {tag: [(step, value)]}, from every
    directory of the job holding event files (later files win on a repeated step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = sorted({p.parent for p in job_dir.rglob("events.out.tfevents*")})
    curves: dict[str, dict[int, float]] = {}
    for event_dir in event_dirs:
        accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
        try:
            accumulator.Reload()
        except Exception:  # a truncated event file (killed job) must not stop the report
            continue
        for tag in tags:
            if tag in accumulator.Tags().get("scalars", []):
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


# ------------------------------------------------------------------ evidence distance

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


# --------------------------------------------------------------------------- the report


def machine() -> str:
    """Where the report was made: platform, CPU count, torch version and CUDA device."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {device}"
    )


def missing_markdown(root: Path, failed: list[dict], unstarted: list[str]) -> str:
    """The "Missing or failed jobs" list: each job directory with its log's error line."""
    lines = []
    for job in failed:
        error = error_line(job["dir"])
        note = (
            f": `{error}`"
            if error
            else ": no metrics.json (failed or unfinished), no error in its log"
        )
        lines.append(f"- `{job['name']}`{note}")
    lines += [f"- job {entry}: listed in multirun.yaml, never started" for entry in unstarted]
    return "\n".join(lines)


def build_report(root: Path, claims_file: Path | None = None, baseline=None, treatment=None) -> str:
    """Write report.md, report.csv, loss_curves.png and metrics.png into root; return the
    Markdown. Raises ConfigError when no job under root has metrics."""
    from herd.utils.run import git_revision

    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; pass a multirun (sweep) or run directory.")
    claims = load_claims(claims_file) if claims_file else None
    jobs = find_jobs(root)
    finished = [job for job in jobs if job["metrics"] is not None]
    failed = [job for job in jobs if job["metrics"] is None]
    unstarted = never_started(root, jobs)
    if not finished:
        raise ConfigError(
            f"No job under {root} has a metrics.json ({len(jobs)} job directories found); "
            "pass the sweep's directory (hydra.sweep.dir) once a job has finished."
        )
    keys = swept_keys(jobs)  # failed jobs too: a setting that never finished still varies
    rows = settings_table(finished, keys)
    metrics = metric_order(name for row in rows for name in row["metrics"])

    sections = [
        f"# herd report: {root}",
        f"{len(finished)} finished job(s) in {len(rows)} setting(s)"
        + (f", swept: {', '.join(keys)}" if keys else "")
        + ". Metrics are mean ± sample std over the setting's jobs (seeds); n jobs each.",
        "## Settings",
        settings_markdown(rows, keys, metrics),
    ]
    if claims:
        sections += [
            "## Claimed vs measured",
            "Relative change (treatment - baseline) / |baseline| of the means over all "
            "matching jobs with the metric; n = jobs on each side.",
            claims_markdown(claims_rows(claims, finished, baseline, treatment)),
        ]
    if failed or unstarted:
        sections += ["## Missing or failed jobs", missing_markdown(root, failed, unstarted)]
    jobs_by_name = {job["name"]: job for job in finished}
    trained = trained_parameters_table(rows, jobs_by_name)
    if trained:
        sections += [
            "## Trained parameters",
            "Read from each job, not from its config: per module part, the parameters that "
            "received a gradient during training / those the optimizer held ('—': not in "
            "the optimizer).",
            trained,
        ]
    plots = []
    if plot_loss_curves(root / "loss_curves.png", rows, jobs_by_name):
        plots.append("![loss curves](loss_curves.png)")
    if plot_metric_bars(root / "metrics.png", rows, metrics):
        plots.append("![final metrics](metrics.png)")
    by_distance = distance_table(rows, jobs_by_name)
    if by_distance:
        sections += [
            "## By evidence distance",
            "Each test answer scored within bins of how far back its evidence lies (tokens "
            "from the evidence to the end of the prompt), mean ± std over seeds "
            "(test_predictions.jsonl of each job).",
            distance_markdown(by_distance, keys),
        ]
        plot_distance(root / "evidence_distance.png", by_distance)
        plots.append("![metrics by evidence distance](evidence_distance.png)")
    if plots:
        sections += ["## Plots", "\n\n".join(plots)]
    sections += [
        "## Provenance",
        f"- git revision: {git_revision()}\n- machine (this report): {machine()}",
    ]
    report = "\n\n".join(sections) + "\n"
    (root / "report.md").write_text(report)
    write_csv(root / "report.csv", rows, keys, metrics)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="herd-report",
        description="One table (report.md, report.csv) and plots of a sweep's jobs.",
    )
    parser.add_argument("directory", type=Path, help="a multirun (sweep) or run directory")
    parser.add_argument(
        "--claims", type=Path, help="YAML of claimed relative changes to put beside the measured"
    )
    parser.add_argument(
        "--baseline",
        nargs="+",
        metavar="KEY=VALUE",
        help="select the baseline jobs for every claim (replaces the claims file's baseline)",
    )
    parser.add_argument(
        "--treatment",
        nargs="+",
        metavar="KEY=VALUE",
        help="select the treatment jobs for every claim (replaces the claims file's treatment)",
    )
    parser.add_argument("--quiet", action="store_true", help="do not print the report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of herd-report: errors are one line on stderr and exit status 1."""
    args = parse_args(argv)
    try:
        if (args.baseline or args.treatment) and not args.claims:
            raise ConfigError(
                "--baseline/--treatment select jobs for --claims; pass --claims FILE."
            )
        report = build_report(
            args.directory,
            args.claims,
            parse_selector(args.baseline),
            parse_selector(args.treatment),
        )
    except ConfigError as error:
        print(f"herd-report: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(report)
    print(
        f"herd-report: wrote report.md, report.csv and plots to {args.directory}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
