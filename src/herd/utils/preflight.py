"""Checks that run before any data is read or model built: a combination that cannot run
on this machine stops here with one sentence naming the option and what to use instead."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from herd.errors import ConfigError
from herd.utils.config import swept_keys

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


def native_bf16() -> bool:
    """Whether this machine computes bf16 matmuls natively: a CUDA GPU with bf16 support, or
    a CPU with AVX-512 BF16 or AMX (elsewhere bf16 is emulated and slower than fp32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell, so no bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# precision=auto: bf16 autocast where native, else fp32 (see configs/precision/auto.yaml)
OmegaConf.register_new_resolver(
    "herd_auto_precision", lambda: "bf16-mixed" if native_bf16() else "32-true", replace=True
)


def job_name(num, overrides: str) -> str:
    """A sweep job's directory, and so its run name in TensorBoard: its number and the
    settings given on the command line (hydra.job.override_dirname), the swept ones first,
    e.g. "3_context=2k,seed=2,trainer.max_steps=50". Path-valued settings are left out; the
    rest is kept to filesystem-safe characters and 120 of them."""
    kept = [item.lstrip("+~") for item in str(overrides).split(",") if item and "/" not in item]
    swept = sweep_keys_of_this_job()
    kept.sort(key=lambda item: item.split("=", 1)[0] not in swept)  # stable: else as given
    name = re.sub(r"[^A-Za-z0-9._=,\-\[\]]", "_", ",".join(kept))[:120]
    return f"{num}_{name}" if name else str(num)


def sweep_keys_of_this_job() -> list[str]:
    """The keys the running multirun varies ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return swept_keys(HydraConfig.get().sweep.dir)
    except Exception:  # not inside a Hydra job, or its config is not complete yet
        return []


OmegaConf.register_new_resolver("herd_job_name", job_name, replace=True)


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


# Numeric settings by their last key: (test, what the value must be). Checked wherever they
# sit under data., model., trainer. and callbacks., so a new data module or model inherits
# the check by naming its settings alike.
def _whole(low: int):
    return lambda v: float(v).is_integer() and v >= low


NUMERIC_RULES: dict[str, tuple] = {
    **dict.fromkeys(
        (
            "batch_size",
            "seq_len",
            "max_seq_len",
            "image_size",
            "num_classes",
            "train_size",
            "log_every_n_steps",
            "accumulate_grad_batches",
            "num_nodes",
            "max_skipped",
        ),
        (_whole(1), "a whole number of at least 1"),
    ),
    **dict.fromkeys(
        ("num_workers", "warmup_steps", "passkey_docs", "passkey_train"),
        (_whole(0), "a whole number of at least 0"),
    ),
    **dict.fromkeys(
        ("max_steps", "max_epochs"),
        (lambda v: v == -1 or _whole(1)(v), "a whole number of at least 1, or -1 for no limit"),
    ),
    "val_check_interval": (
        lambda v: v > 0 and (float(v).is_integer() or v <= 1),
        "a number of steps (at least 1) or a fraction of an epoch in (0, 1]",
    ),
    **dict.fromkeys(
        ("limit_train_batches", "limit_val_batches", "limit_test_batches"),
        (
            lambda v: v >= 0 and (float(v).is_integer() or v <= 1),
            "a number of batches (at least 0) or a fraction in [0, 1]",
        ),
    ),
    **dict.fromkeys(
        ("lr", "max_seconds"),
        (lambda v: v > 0, "a number greater than 0"),
    ),
    **dict.fromkeys(
        ("weight_decay", "gradient_clip_val"),
        (lambda v: v >= 0, "a number of at least 0"),
    ),
    **dict.fromkeys(
        ("val_fraction", "test_fraction", "min_lr_ratio", "dropout", "attn_dropout"),
        (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    ),
}
NUMERIC_SECTIONS = ("data", "model", "trainer", "callbacks")


def _leaves(node: DictConfig | ListConfig, prefix: str):
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        try:
            value = node[key]
        except OmegaConfBaseException:  # missing (???) or unresolvable: reported where used
            continue
        if isinstance(value, DictConfig | ListConfig):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def check_settings(cfg: DictConfig) -> None:
    """Sizes, rates, step counts and fractions, checked before any work: a bad value stops
    the run with one sentence naming the setting, not a traceback from deep inside."""
    for section in NUMERIC_SECTIONS:
        node = cfg.get(section)
        if not isinstance(node, DictConfig):
            continue
        for path, value in _leaves(node, section):
            rule = NUMERIC_RULES.get(path.rsplit(".", 1)[-1])
            if rule is None or value is None:
                continue
            test, wanted = rule
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or not test(value):
                raise ConfigError(f"{path}={value!r} is not valid: it must be {wanted}.")
