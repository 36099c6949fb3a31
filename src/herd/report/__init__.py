"""herd-report MULTIRUN_DIR: one table of a sweep's settings and final metrics, with plots.

    herd-report logs/train/multiruns/2026-11-26_10-00-00
    herd-report experiments/context_ablation/runs --claims experiments/context_ablation/claims.yaml
    herd-report DIR --claims claims.yaml --baseline context=512t --treatment context=8k

Every job directory below MULTIRUN_DIR (one holding `.hydra/`) is read: its overrides
(`.hydra/overrides.yaml`), resolved config (`.hydra/config.yaml`), `metrics.json` and
TensorBoard events. Jobs with the same overrides apart from `seed` form one setting; the
override keys that differ between jobs are the table's columns, and each metric is the
mean ± sample std over the setting's seeds. Written into MULTIRUN_DIR:

    report.md          settings table, trained parameters, missing or failed jobs, claims table,
                       evidence distance, git revision, machine
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

from herd.report.claims import claims_rows, load_claims
from herd.report.cli import build_report, main
from herd.report.jobs import find_jobs

__all__ = ["build_report", "claims_rows", "find_jobs", "load_claims", "main"]
