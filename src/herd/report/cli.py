"""herd-report's entry point: build_report writes report.md, report.csv and the plots."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

from herd.errors import ConfigError
from herd.report.claims import claims_markdown, claims_rows, load_claims, parse_selector
from herd.report.distance import distance_markdown, distance_table, plot_distance
from herd.report.jobs import error_line, find_jobs, never_started, swept_keys
from herd.report.plots import plot_loss_curves, plot_metric_bars
from herd.report.tables import (
    metric_order,
    settings_markdown,
    settings_table,
    trained_parameters_table,
    write_csv,
)
from herd.utils.cli import report_error


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
    except Exception as exc:
        return report_error("herd-report", exc)
    if not args.quiet:
        print(report)
    print(
        f"herd-report: wrote report.md, report.csv and plots to {args.directory}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
