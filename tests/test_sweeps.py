"""Sweeps a reviewer can re-run: herd-report's tables, plots, missing jobs and claims; seeds
that reproduce; 2-process ddp that writes one run directory; the Optuna search config."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from herd.report import build_report, claims_rows, find_jobs, load_claims, main
from herd.train import CONFIG_DIR

from .conftest import FAST, REPO, run_cli

TINY_SWEEP = [
    "experiment=language_tiny",
    *FAST,
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    # evaluation on 2 batches: the jobs take seconds, the tables and curves stay complete
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
]


def fake_job(root: Path, name: str, overrides: list[str], metrics: dict | None, log: str = ""):
    """A job directory as herd-train leaves it, without training: .hydra/, metrics.json, log."""
    job_dir = root / name
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"seed": 42, "context": {"name": "512t"}, "model": {"optimizer": {"lr": 0.003}}}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None:
        (job_dir / "metrics.json").write_text(json.dumps(metrics))
    if log:
        (job_dir / "train.log").write_text(log)
    return job_dir


def comparable(metrics: dict) -> dict:
    """Metrics that must reproduce exactly: everything but timing (perf/tokens_per_sec)."""
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


# --------------------------------------------------------------------------- a real tiny sweep


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """Four real jobs in one multirun: two learning rates x two seeds."""
    logs = tmp_path_factory.mktemp("logs")
    sweep_dir = logs / "sweep"
    result = run_cli(
        "herd.train",
        "-m",
        *TINY_SWEEP,
        "model.optimizer.lr=0.001,0.003",
        "seed=1,2",
        f"hydra.sweep.dir={sweep_dir}",
        log_dir=logs,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_report_of_a_tiny_sweep_has_one_row_per_setting_with_mean_and_std(tiny_sweep):
    assert main([str(tiny_sweep), "--quiet"]) == 0
    report = (tiny_sweep / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model.optimizer.lr"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    # the swept key is a column, the constant overrides and the seed are not
    assert columns[:3] == ["model.optimizer.lr", "n", "seeds"]
    assert "val/loss" in columns and "test/loss" in columns
    assert "seed" not in columns and "trainer.max_steps" not in columns
    rows = [line for line in report.splitlines() if line.startswith(("| 0.001 ", "| 0.003 "))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == ["2", "1,2"]
        assert "±" in cells[columns.index("val/loss")]
    assert "git revision:" in report and "CPUs" in report
    assert "Missing or failed" not in report

    with (tiny_sweep / "report.csv").open() as fh:
        table = {row["model.optimizer.lr"]: row for row in csv.DictReader(fh)}
    assert set(table) == {"0.001", "0.003"}
    jobs = [j for j in find_jobs(tiny_sweep) if j["overrides"]["model.optimizer.lr"] == "0.001"]
    losses = [j["metrics"]["val/loss"] for j in jobs]
    assert float(table["0.001"]["val/loss mean"]) == pytest.approx(statistics.fmean(losses))
    assert float(table["0.001"]["val/loss std"]) == pytest.approx(statistics.stdev(losses))
    for plot in ("loss_curves.png", "metrics.png"):
        assert (tiny_sweep / plot).stat().st_size > 10_000


@pytest.mark.slow
def test_a_sweep_reads_at_a_glance_in_tensorboard(tiny_sweep):
    """What TensorBoard shows of the sweep: runs named by their settings, and an HParams
    table whose first columns are the swept settings and whose first metrics are test/val
    ones (read from the experiment summary each run writes, which the HParams tab reads)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = sorted(p.name for p in tiny_sweep.iterdir() if p.is_dir())
    assert (
        runs[0].startswith("0_") and "model.optimizer.lr=0.001" in runs[0] and "seed=1" in runs[0]
    )
    events = EventAccumulator(str(tiny_sweep / runs[0]))
    events.Reload()
    meta = events.summary_metadata["_hparams_/experiment"].plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(meta).experiment
    hparams = [info.name for info in experiment.hparam_infos]
    assert hparams[:2] == ["model.optimizer.lr", "seed"], hparams[:6]
    assert "trainer.max_steps" in hparams[:8]  # the other command-line settings next
    metrics = [info.name.tag for info in experiment.metric_infos]
    assert metrics[0].startswith(("final/test/", "final/val/")), metrics[:4]


@pytest.mark.slow
def test_same_seed_reproduces_the_metrics_and_another_seed_does_not(tiny_sweep, tmp_path):
    # the third job of the sweep (lr=0.003, seed=1) ran after two others in the same process;
    # a fresh process with the same settings must give the very same numbers
    again = run_cli(
        "herd.train",
        *TINY_SWEEP,
        "model.optimizer.lr=0.003",
        "seed=1",
        f"hydra.run.dir={tmp_path / 'again'}",
        log_dir=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    repeated = comparable(json.loads((tmp_path / "again" / "metrics.json").read_text()))
    by_seed = {
        j["overrides"]["seed"]: comparable(j["metrics"])
        for j in find_jobs(tiny_sweep)
        if j["overrides"]["model.optimizer.lr"] == "0.003"
    }
    assert repeated == by_seed["1"]
    assert repeated["val/loss"] != by_seed["2"]["val/loss"]


# --------------------------------------------------------------------------- partial sweeps


def test_report_names_a_failed_job_and_a_job_that_never_started(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, "0", ["lr=1", "seed=1"], {"val/loss": 2.0})
    fake_job(sweep, "1", ["lr=1", "seed=2"], {"val/loss": 2.2})
    fake_job(
        sweep,
        "2",
        ["lr=2", "seed=1"],
        None,
        log="[INFO] - Seed set to 1\nherd: error: data.source=manifest needs data.manifest=PATH\n",
    )
    # Hydra's listing of the sweep: 4 jobs planned, job 3 has no directory at all
    hydra_listing = {
        "hydra": {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
            "sweep": {"dir": str(sweep), "subdir": "${hydra.job.num}"},
            "overrides": {"task": ["lr=1,2", "seed=1,2"]},
        }
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(hydra_listing))

    report = build_report(sweep)

    missing = report.split("## Missing or failed jobs")[1].split("##")[0]
    assert "`2`: `herd: error: data.source=manifest needs data.manifest=PATH`" in missing
    assert "job 3 (lr=2 seed=2)" in missing and "never started" in missing
    assert "| 1 | 2 | 1,2 | 2.1 ± 0.1414 |" in report  # the finished setting is still tabulated


def test_report_of_a_directory_without_metrics_fails_with_one_line(tmp_path, capsys):
    fake_job(tmp_path, "0", ["lr=1"], None)
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("herd-report: error: No job under") and "\n" not in err
    assert main([str(tmp_path / "nowhere")]) == 1


# --------------------------------------------------------------------------- claims


def test_claims_table_puts_the_claimed_beside_the_measured_relative_change(tmp_path):
    sweep = tmp_path / "sweep"
    # BLEU 20 -> 23 (+15 %, two seeds each), WER 0.5 -> 0.45 (-10 %); top1 never measured
    for num, (context, seed, bleu, wer) in enumerate(
        [
            ("8k", 1, 19.0, 0.5),
            ("8k", 2, 21.0, 0.5),
            ("128k", 1, 22.0, 0.45),
            ("128k", 2, 24.0, 0.45),
        ]
    ):
        fake_job(
            sweep,
            str(num),
            [f"context={context}", f"seed={seed}"],
            {"test/bleu": bleu, "test/wer": wer},
        )
    claims_file = tmp_path / "claims.yaml"
    claims_file.write_text(
        yaml.safe_dump(
            {
                metric: {
                    "claimed_relative_change": claimed,
                    "baseline": {"context": "8k"},
                    "treatment": {"context": "128k"},
                }
                for metric, claimed in (
                    ("test/bleu", 0.15),
                    ("test/top1", 0.10),
                    ("test/wer", -0.20),
                )
            }
        )
    )
    rows = {r["metric"]: r for r in claims_rows(load_claims(claims_file), find_jobs(sweep))}
    assert rows["test/bleu"]["measured"] == pytest.approx(0.15)
    assert rows["test/bleu"]["baseline"][1:] == pytest.approx((20.0, 2, 2**0.5))
    assert rows["test/bleu"]["separation"] == pytest.approx(3 / 2**0.5)  # gap / seed std
    assert rows["test/wer"]["measured"] == pytest.approx(-0.10)
    assert rows["test/top1"]["measured"] is None

    report = build_report(sweep, claims_file)
    table = report.split("## Claimed vs measured")[1]
    assert (
        "| test/bleu | context=8k | context=128k | 20 ± 1.414 (2) | 23 ± 1.414 (2) | +15.0% "
        "| +15.0% | yes | 2.1 |" in table
    )
    assert (
        "| test/wer | context=8k | context=128k | 0.5 ± 0 (2) | 0.45 ± 0 (2) | -20.0% | -10.0% "
        "| yes | inf |" in table
    )
    assert "| test/top1 |" in table and "not measured" in table

    # the command line can select other settings (the CPU-scale pair), matched numerically
    rows = claims_rows(
        load_claims(claims_file),
        find_jobs(sweep),
        {"model.optimizer.lr": "3e-3"},
        {"context": "128k"},
    )
    assert rows[0]["baseline"][1:3] == (21.5, 4)


def test_a_malformed_claims_file_fails_with_one_line(tmp_path, capsys):
    fake_job(tmp_path / "sweep", "0", ["seed=1"], {"val/loss": 1.0})
    claims_file = tmp_path / "claims.yaml"
    claims_file.write_text("test/bleu: {claimed_relative_change: 0.15}\n")
    assert main([str(tmp_path / "sweep"), "--claims", str(claims_file)]) == 1
    assert "needs claimed_relative_change, baseline and treatment" in capsys.readouterr().err


# --------------------------------------------------------------------------- hparams_search


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def test_a_sweep_job_is_named_by_its_number_and_settings():
    from herd.utils.preflight import job_name

    overrides = "++model.init_from=/tmp/a/b.ckpt,context=2k,data.doc_tokens=[300,2000],seed=2"
    assert job_name(3, overrides) == "3_context=2k,data.doc_tokens=[300,2000],seed=2"
    assert job_name(0, "") == "0"
    assert job_name(1, "tags=[a b]," + "x" * 300) == "1_tags=[a_b]," + "x" * 109


def test_hparams_search_optuna_configures_a_tpe_search_over_lr_and_warmup():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
    cfg = compose_train("hparams_search=optuna", "experiment=language_tiny")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.direction == "minimize" and cfg.optimized_metric == "val/loss"
    assert set(sweeper.params) == {"model.optimizer.lr", "model.scheduler.warmup_steps"}
    assert sweeper.params["model.optimizer.lr"].startswith("tag(log, interval(")
    # a cut study continues from its storage in the sweep directory, trials named by params
    raw = OmegaConf.to_container(cfg.hydra, resolve=False)
    assert raw["sweeper"]["storage"] == "sqlite:///${hydra.sweep.dir}/optuna.db"
    assert sweeper.study_name == "herd"
    assert raw["sweep"]["subdir"] == "${hydra.job.override_dirname}"


def test_hparams_search_optuna_without_the_plugin_names_the_missing_sweeper():
    try:
        import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("hydra-optuna-sweeper is installed")
    with pytest.raises(Exception, match=r"hydra/sweeper/optuna"):
        compose_train("hparams_search=optuna")


# --------------------------------------------------------------------------- ddp


def run_directories(logs: Path) -> list[Path]:
    return sorted(p.parent for p in logs.rglob(".hydra"))


@pytest.mark.slow
def test_two_process_ddp_writes_one_run_directory(tmp_path):
    result = run_cli(
        "herd.train",
        *FAST,
        "experiment=language_tiny",
        "strategy=ddp",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        log_dir=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_directories(tmp_path)
    assert (run_dir / "metrics.json").is_file()
    assert [p.parent for p in tmp_path.rglob("checkpoints")] == [run_dir]
    assert len(list(tmp_path.rglob("metrics.json"))) == 1


@pytest.mark.slow
def test_ddp_jobs_of_a_herd_train_multirun_share_the_sweep_directory(tmp_path):
    # the console script, and two jobs in one process: the second must launch its own rank 1
    herd_train = Path(sys.executable).parent / "herd-train"
    if not herd_train.is_file():
        pytest.skip("herd-train console script not installed in this environment")
    env = {**os.environ, "HERD_LOG_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [str(herd_train), "-m", *TINY_SWEEP, "strategy=ddp", "trainer.max_steps=2", "test=false",
         "trainer.val_check_interval=2", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # each job's directory (its run name in TensorBoard) shows its number and settings
    names = [d.name for d in run_directories(tmp_path)]
    assert [n.split("_", 1)[0] for n in names] == ["0", "1"]
    assert "seed=1" in names[0] and "seed=2" in names[1]
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
    assert len(list(tmp_path.rglob("multirun.yaml"))) == 1


# --------------------------------------------------------------------------- a crashed sweep


def job(sweep: Path, number: str) -> Path:
    """A sweep job's directory: its number, then its settings (3_seed=4,...)."""
    (found,) = sweep.glob(f"{number}_*")
    return found


def job_files(job_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a job directory: its bytes, and its modification time except for
    Hydra's .hydra/ (Hydra writes it again, the same, before a job starts)."""
    return {
        str(p.relative_to(job_dir)): (
            p.read_bytes(),
            0 if p.parent.name == ".hydra" else p.stat().st_mtime_ns,
        )
        for p in sorted(job_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_sweep_killed_in_its_third_job_finishes_when_rerun(tmp_path):
    logs, marker = tmp_path / "logs", tmp_path / "killed-once"
    sweep = logs / "sweep"
    quick = ("trainer.max_steps", "trainer.val_check_interval", "data.batch_size")
    command = [
        "-m",
        *(o for o in TINY_SWEEP if not o.startswith(quick)),
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "data.batch_size=1",
        "callbacks.text_samples=null",
        "seed=1,2,3,4",
        f"hydra.sweep.dir={sweep}",
        "auto_resume=true",
        # the whole sweep process dies in job 2 after its step-2 checkpoint, once
        "+callbacks.crash._target_=tests.helpers.crash.KillInJob",
        "+callbacks.crash.job=2",
        "+callbacks.crash.step=3",
        f"+callbacks.crash.marker={marker}",
    ]
    crashed = run_cli("herd.train", *command, log_dir=logs)
    assert crashed.returncode == -9 and marker.exists(), crashed.stderr[-3000:]
    assert [(job(sweep, j) / "metrics.json").is_file() for j in "012"] == [True, True, False]
    assert not list(sweep.glob("3_*"))
    finished = {j: job_files(job(sweep, j)) for j in "01"}

    rerun = run_cli("herd.train", *command, log_dir=logs)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # the finished jobs were not retrained: not a byte nor a timestamp changed
    for j in "01":
        assert job_files(job(sweep, j)) == finished[j], j
    assert rerun.stdout.count("finished earlier with these settings; kept") == 2
    # the cut job continued from its checkpoint, the unstarted one ran
    assert "Resuming from" in (job(sweep, "2") / "train.log").read_text()
    for j in "23":
        metrics = json.loads((job(sweep, j) / "metrics.json").read_text())
        assert {"val/loss", "test/loss", "train/loss"} <= set(metrics), j

    assert main([str(sweep), "--quiet"]) == 0
    report = (sweep / "report.md").read_text()
    assert "Missing or failed" not in report
    jobs = find_jobs(sweep)
    assert sorted(j["overrides"]["seed"] for j in jobs) == ["1", "2", "3", "4"]
    rows = [line for line in report.splitlines() if line.startswith("| ") and "±" in line]
    assert len(rows) == 1 and "| 4 | 1,2,3,4 |" in rows[0], report
