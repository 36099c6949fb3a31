"""herd-report RUN_OR_SWEEP_DIR: one table of every run's settings and final metrics.

Finds each `metrics.json` below the directory, pairs it with the run's Hydra overrides
(`.hydra/overrides.yaml`), and writes `report.md` and `report.csv` beside them. Runs that
never wrote metrics (failed or still running) are listed, not fatal.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml


def collect(root: Path) -> tuple[list[dict], list[Path]]:
    rows, missing = [], []
    for hydra_dir in sorted(root.rglob(".hydra")):
        run_dir = hydra_dir.parent
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            missing.append(run_dir)
            continue
        settings = dict(o.split("=", 1) for o in overrides or [] if "=" in o)
        rows.append(
            {
                "run": str(run_dir.relative_to(root)) or ".",
                **settings,
                **json.loads(metrics_file.read_text()),
            }
        )
    return rows, missing


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a run or a multirun (sweep) directory")
    args = parser.parse_args(argv)
    root = args.directory
    if not root.is_dir():
        print(f"herd-report: error: {root} is not a directory.", file=sys.stderr)
        return 1
    rows, missing = collect(root)
    if not rows:
        print(f"herd-report: error: no run under {root} has a metrics.json.", file=sys.stderr)
        return 1
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = to_markdown(rows, columns)
    notes = "".join(
        f"\n- no metrics (failed or unfinished): {p.relative_to(root)}" for p in missing
    )
    report = f"# herd report: {root}\n\n{table}\n" + (
        f"\n## Missing runs{notes}\n" if missing else ""
    )
    (root / "report.md").write_text(report)
    with (root / "report.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
