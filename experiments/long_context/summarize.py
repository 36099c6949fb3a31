"""results.md for the context study from its runs' metrics.json files (see run.sh)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path


def metrics(root: Path, run: str) -> dict[str, float]:
    return json.loads((root / run / "metrics.json").read_text())


def main(root: Path) -> None:
    short, short_2k = metrics(root, "short_at_512"), metrics(root, "short_at_2k")
    extended, ext_512 = metrics(root, "extended"), metrics(root, "extended_at_512")
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print("# Context study, CPU scale: results\n")
    print(f"git {revision}, {platform.machine()} CPU, {platform.python_version()}\n")
    print(
        "| passkey accuracy (mean over 5 depths, 10 keys each) | before (512-token model) | after extension to 2048 |"
    )
    print("|---|---|---|")
    for n in (512, 1024, 2048):
        before, after = short_2k.get(f"test/passkey_acc@{n}"), extended.get(f"test/passkey_acc@{n}")
        print(f"| {n} tokens | {before:.0%} | {after:.0%} |")
    b, a = short["test/loss"], ext_512["test/loss"]
    print("\n| short-context (512) test loss | before | after | change |\n|---|---|---|---|")
    print(f"| prose, held-out documents | {b:.3f} | {a:.3f} | {(a - b) / b:+.1%} |")
    goal_passkey = extended.get("test/passkey_acc@2048", 0) >= 0.9
    goal_loss = (a - b) / b <= 0.05
    print(
        f"\nGoals: passkey at 4x >= 90% after extension: {'met' if goal_passkey else 'not met'}; "
        f"short-context loss within 5%: {'met' if goal_loss else 'not met'}."
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
