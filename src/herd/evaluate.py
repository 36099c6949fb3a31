"""herd-eval: test a trained checkpoint of any stage and write metrics.json in a new run
directory.

herd-eval ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt
herd-eval ckpt_path=... context=2k extrapolate=true      # a language model past its length
herd-eval ckpt_path=... data=digits data.batch_size=64   # other data than the run trained on
herd-eval ckpt_path=EXPORT_DIR data=fusion ++data.source=manifest ++data.manifest=FILE
                                                         # a herd-export of a fusion model

The data config is the one the checkpoint was trained with (its interpolations resolved
against this command's settings, e.g. `context=`) unless `data=` picks another; `++data.KEY=`
changes single fields.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from herd.data.images import DIGITS_SPLIT_SEED
from herd.errors import ConfigError
from herd.systems.common import HerdSystem, load_system, read_checkpoint_header
from herd.systems.fusion import FusionSystem
from herd.systems.language import LanguageSystem
from herd.train import CONFIG_DIR, instantiate_all
from herd.utils.cli import report_errors
from herd.utils.preflight import check_hardware, check_settings
from herd.utils.run import final_metrics, log_hparams, write_metrics_json

log = logging.getLogger(__name__)

# data settings that only shape training, and their "off" values
TRAINING_SCHEDULES = {"context_stages": None, "lead_in_weights": None, "lead_in_steps": 0}


def resolve_data_config(cfg: DictConfig, header: dict) -> None:
    """cfg.data := the checkpoint's data config, overridden by any `++data.KEY=` given here;
    a `data=` choice on the command line (a config with a _target_) is used as it is.
    The held-out split is the checkpoint's unless `split_seed=` is given."""
    if cfg.get("split_seed") is None:
        trained_split_seed = (header.get("config") or {}).get("split_seed", DIGITS_SPLIT_SEED)
        with open_dict(cfg):
            cfg.split_seed = trained_split_seed
    given = cfg.get("data") or {}
    if "_target_" in given:
        return
    trained = header.get("data")
    if not trained:
        raise ConfigError(
            f"Checkpoint {cfg.ckpt_path} does not record its data config (a herd-export "
            "directory, or a checkpoint written before herd 0.1 kept it); choose the data with "
            "data=OPTION (e.g. data=text)."
        )
    with open_dict(cfg):
        cfg.data = OmegaConf.merge(trained, given)
        # training schedules (the test runs at context=, and draws no training batches): a
        # checkpoint's lead-in would otherwise be checked against the tasks chosen here
        for key, off in TRAINING_SCHEDULES.items():
            if cfg.data.get(key) and key not in given:
                cfg.data[key] = off


def fit_language_context(cfg: DictConfig, system: LanguageSystem) -> None:
    """Refuse (or, with extrapolate=true, allow) a context longer than the model's."""
    model_len = system.model.config.max_seq_len
    seq_len = cfg.data.get("seq_len") or model_len
    if cfg.get("extrapolate") and seq_len > model_len:
        log.warning("Extrapolating: evaluating a %d-token model at %d tokens.", model_len, seq_len)
        # set directly: validation would (rightly) refuse unscaled RoPE past 8K
        config = copy.copy(system.model.config)
        object.__setattr__(config, "max_seq_len", seq_len)
        system.model.config = config
    elif seq_len > model_len:
        raise ConfigError(
            f"context={cfg.context.name} ({seq_len} tokens) is longer than this checkpoint's "
            f"context of {model_len} tokens; evaluate with a context of at most {model_len} "
            "(or extrapolate=true to measure it beyond its length)."
        )


def open_system(cfg: DictConfig) -> tuple[HerdSystem, dict]:
    """The system to test and its checkpoint's header: a herd checkpoint, or a fusion model's
    herd-export directory (at this command's context; it records no data, so data= picks it)."""
    path = Path(cfg.ckpt_path)
    if path.is_dir():
        rope = cfg.context.rope_scaling
        context = {
            "max_seq_len": cfg.context.seq_len,
            "rope_scaling": OmegaConf.to_container(rope) if rope is not None else None,
        }
        return FusionSystem(language={"llama": context}, init_from=str(path)), {}
    return load_system(path), read_checkpoint_header(path)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_settings(cfg)
    check_hardware(cfg)
    L.seed_everything(cfg.seed, workers=True)
    system, header = open_system(cfg)
    resolve_data_config(cfg, header)
    if isinstance(system, LanguageSystem):
        fit_language_context(cfg, system)
    if "tokenizer" in cfg.data and "tokenizer" in system.hparams:
        with open_dict(cfg):  # the data must be tokenised as in training
            cfg.data.tokenizer = system.hparams.tokenizer
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
