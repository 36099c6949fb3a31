"""Claimed vs measured: a paper's relative changes against the means of the jobs that the
baseline and treatment selectors pick."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from herd.errors import ConfigError
from herd.report.tables import fmt_mean_std, fmt_number, markdown_table, mean_std


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
