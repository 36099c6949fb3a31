"""Checks that run before any data is read or model built: a combination that cannot run
on this machine stops here with one sentence naming the option and what to use instead."""

from __future__ import annotations

import importlib.util

import torch
from omegaconf import DictConfig

from herd.errors import ConfigError

GPU_ONLY_STRATEGIES = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}
GPU_ONLY_PRECISIONS = {
    "16-mixed": "fp16_mixed",
    "16-true": "fp16 true",
    "transformer-engine": "fp8",
}
# option -> (module it needs, how to install it): optional extras, not in the base install
OPTIONAL_PACKAGES = {
    "deepspeed": ("deepspeed", "pip install -e '.[deepspeed]'"),
    "transformer-engine": ("transformer_engine", "pip install -e '.[fp8]' on the CUDA machine"),
}


def _name(option) -> str:
    if isinstance(option, DictConfig | dict):
        return str(option.get("_target_", option)).rsplit(".", 1)[-1].lower()
    return str(option).lower()


def check_hardware(cfg: DictConfig) -> None:
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible; use trainer.accelerator=cpu "
            "(or auto) on this machine."
        )
    on_gpu = cuda and accelerator in ("gpu", "cuda", "auto")
    strategy = _name(trainer.get("strategy", "auto"))
    precision = str(trainer.get("precision", "32-true"))
    if on_gpu:
        for key, (module, install) in OPTIONAL_PACKAGES.items():
            if key in strategy or precision.startswith(key):
                if importlib.util.find_spec(module) is None:
                    raise ConfigError(
                        f"{key} needs the {module} package, which is not installed; {install}."
                    )
        return
    for key, label in GPU_ONLY_STRATEGIES.items():
        if key in strategy:
            raise ConfigError(
                f"strategy={key} ({label}) needs CUDA GPUs and this run is on CPU; "
                "use strategy=ddp_spawn (2 CPU processes) or strategy=single."
            )
    for key, label in GPU_ONLY_PRECISIONS.items():
        if precision.startswith(key):
            raise ConfigError(
                f"precision={label} ({precision}) needs a CUDA GPU and this run is on CPU; "
                "use precision=bf16_mixed or precision=fp32."
            )


def check_context(cfg: DictConfig) -> None:
    data_len = cfg.get("data", {}).get("seq_len")
    model_len = cfg.get("model", {}).get("llama", {}).get("max_seq_len")
    if data_len and model_len and data_len > model_len:
        raise ConfigError(
            f"data.seq_len={data_len} is longer than the model's max_seq_len={model_len}; "
            "set the length once with context= instead of overriding either."
        )
