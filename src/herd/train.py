"""herd-train: train one stage (language, vision, speech, fusion) from a Hydra config.

herd-train                                   # defaults: small Llama, 512 context, CPU
herd-train experiment=language_tiny trainer.max_steps=10
herd-train -m context=512t,2k precision=fp32,bf16_mixed
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from herd.callbacks.resume import ExactResume
from herd.errors import ConfigError
from herd.systems.common import read_checkpoint_header
from herd.utils.cli import report_errors
from herd.utils.ddp_launch import DDP_LAUNCH_ENV, end_ddp_job, use_job_dir_for_ddp_children
from herd.utils.preflight import check_context, check_hardware, check_settings
from herd.utils.run import (
    final_metrics,
    finished_metrics,
    flatten,
    log_hparams,
    mark_finished,
    peak_memory_gb,
    provenance_of,
    reset_peak_memory,
    write_metrics_json,
)
from herd.utils.strategies import strategy_override

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a config as the entry points would, with Hydra's runtime pointing at
    output_dir: `train(compose_config("train", [...], dir))` is a herd-train run from Python
    (tests, benchmarks, notebooks)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir.parent)
        del cfg.hydra
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def instantiate_all(section: DictConfig | None) -> list:
    """Instantiate every `_target_` entry of a config section (callbacks, loggers)."""
    if not section:
        return []
    return [hydra.utils.instantiate(c) for c in section.values() if c and "_target_" in c]


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: `ckpt_path` (`last` = this run directory's last.ckpt),
    or with auto_resume=true the run directory's last.ckpt when there is one. A checkpoint
    written by another system or with other model settings is refused, naming the keys."""
    ckpt = cfg.get("ckpt_path")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if ckpt == "last" or (ckpt is None and cfg.get("auto_resume")):
        if last.is_file():
            ckpt = str(last)
        elif ckpt == "last":
            raise ConfigError(
                f"ckpt_path=last but {last} does not exist; rerun in the interrupted run's "
                "directory (hydra.run.dir=...) or pass the checkpoint's path."
            )
        else:
            return None
    if ckpt is None:
        return None
    header = read_checkpoint_header(ckpt)
    wanted = cfg.model.get("_target_", "")
    if not header["system"].endswith(str(wanted).rsplit(".", 1)[-1]):
        raise ConfigError(
            f"Checkpoint {ckpt} was written by {header['system']}, but this run trains "
            f"{wanted}; resume it with the experiment that wrote it."
        )
    trained = (header.get("config") or {}).get("model")
    if trained:
        now = flatten(OmegaConf.to_container(cfg.model, resolve=True, throw_on_missing=False))
        before = flatten(trained)
        differ = sorted(k for k in now.keys() & before.keys() if now[k] != before[k])
        if differ:
            listed = ", ".join(
                f"model.{k}={before[k]!r} (checkpoint) vs {now[k]!r}" for k in differ
            )
            raise ConfigError(
                f"Checkpoint {ckpt} was trained with other model settings: {listed}; resume with "
                "the checkpoint's settings (or fine-tune from it with model.pretrained=)."
            )
    return ckpt


def train(cfg: DictConfig) -> dict[str, float]:
    check_settings(cfg)
    check_hardware(cfg)
    check_context(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.train and cfg.get("auto_resume") and cfg.get("ckpt_path") is None:
        done = finished_metrics(output_dir, cfg)
        if done is not None:  # a finished job is never touched again (not even its log)
            print(f"herd: {output_dir} finished earlier with these settings; kept.", flush=True)
            return done
    ckpt_path = resume_checkpoint(cfg) if cfg.train else cfg.get("ckpt_path")
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    system = hydra.utils.instantiate(cfg.model, _recursive_=False)
    system.provenance = provenance_of(cfg)
    # first, so that its restore precedes any other callback's draw in a training batch
    exact_resume = ExactResume()
    callbacks = [exact_resume, *instantiate_all(cfg.get("callbacks"))]
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        **strategy_override(cfg.trainer.get("strategy"), system),
    )

    reset_peak_memory(trainer.strategy.root_device)
    fit_seconds = None
    if cfg.train:
        if ckpt_path:
            log.info("Resuming from %s", ckpt_path)
            cuda = trainer.strategy.root_device.type == "cuda"
            if cuda and not torch.are_deterministic_algorithms_enabled():
                log.warning(
                    "The random state is restored, but CUDA kernels without a deterministic "
                    "implementation can make the losses after this resume differ in their last "
                    "bits from an uninterrupted run; trainer.deterministic=true avoids that."
                )
        started = time.perf_counter()
        trainer.fit(system, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        fit_seconds = time.perf_counter() - started
    # a run resumed after its last step trains nothing: its checkpoint has the fit metrics
    fit_metrics = {**exact_resume.restored_metrics, **trainer.callback_metrics}

    test_metrics = {}
    if cfg.test:
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best and cfg.train:
            log.warning("No best checkpoint was saved by this run.")
        ckpt = best or ckpt_path  # train=false: test the checkpoint given
        trainer.test(system, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=True)
        test_metrics = dict(trainer.callback_metrics)

    # trivial baselines the data module knows (e.g. a unigram model's loss, chance accuracy)
    if getattr(datamodule, "spec", False) is None:  # after ddp_spawn this process's trainer
        datamodule.setup_for(system.input_spec())  # holds no model to read the inputs from
    references = datamodule.reference_metrics() if hasattr(datamodule, "reference_metrics") else {}
    perf = {"perf/peak_memory_gb": peak_memory_gb(trainer.strategy.root_device)}
    if fit_seconds is not None:  # wall time of training with its validation, not the test
        perf["perf/fit_wall_s"] = fit_seconds
    metrics = final_metrics(fit_metrics, test_metrics, references, perf)
    if trainer.is_global_zero and not trainer.fast_dev_run:
        log_hparams(trainer.loggers, cfg, metrics, step=trainer.global_step)
        # last, in this order: a run counts as finished once both exist (see finished_metrics)
        write_metrics_json(output_dir, metrics)
        if cfg.train:
            mark_finished(output_dir, cfg)
        summary = ", ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if k.split("/")[0] in ("val", "test")
        )
        log.info("Final metrics: %s", summary)
        log.info("Run directory: %s  (tensorboard --logdir %s)", output_dir, cfg.paths.log_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@report_errors
def main(cfg: DictConfig) -> float | None:
    use_job_dir_for_ddp_children()
    env_before = {name for name in DDP_LAUNCH_ENV if name in os.environ}
    try:
        metrics = train(cfg)
    finally:
        end_ddp_job(env_before)
    # the value Hydra sweepers (e.g. Optuna) optimise
    return metrics.get(cfg.get("optimized_metric", "val/loss"))


if __name__ == "__main__":
    main()
