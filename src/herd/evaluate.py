"""herd-eval: test a trained checkpoint and write metrics.json in a new run directory.

herd-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, open_dict

from herd.errors import ConfigError
from herd.systems.common import load_system
from herd.train import CONFIG_DIR, instantiate_all
from herd.utils.cli import report_errors
from herd.utils.preflight import check_hardware
from herd.utils.run import final_metrics, log_hparams, write_metrics_json

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_hardware(cfg)
    L.seed_everything(cfg.seed, workers=True)
    system = load_system(cfg.ckpt_path)
    model_len = system.model.config.max_seq_len
    if cfg.get("extrapolate") and cfg.data.seq_len > model_len:
        log.warning(
            "Extrapolating: evaluating a %d-token model at %d tokens.", model_len, cfg.data.seq_len
        )
        # set directly: validation would (rightly) refuse unscaled RoPE past 8K
        config = copy.copy(system.model.config)
        object.__setattr__(config, "max_seq_len", cfg.data.seq_len)
        system.model.config = config
    elif cfg.data.seq_len > model_len:
        raise ConfigError(
            f"context={cfg.context.name} ({cfg.data.seq_len} tokens) is longer than this checkpoint's "
            f"context of {model_len} tokens; evaluate with a context of at most {model_len} "
            "(or extrapolate=true to measure it beyond its length)."
        )
    with open_dict(cfg):
        cfg.data.tokenizer = system.hparams.tokenizer  # the data must be tokenised as in training
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = instantiate_all(cfg.get("callbacks"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    trainer.test(system, datamodule=datamodule)

    metrics = final_metrics(trainer.callback_metrics)
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        write_metrics_json(output_dir, metrics)
        log_hparams(trainer.loggers, cfg, metrics, step=0)
        log.info("Metrics: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        log.info("Run directory: %s", output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@report_errors
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
