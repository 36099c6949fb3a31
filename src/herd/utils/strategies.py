"""Distributed strategies that need more than a name in config (built by Hydra from
`configs/strategy/`). Model code stays single-device; wrapping happens here and in the
systems' `configure_model`, in the order checkpointing -> compile -> FSDP."""

from __future__ import annotations

from hydra.utils import get_class
from lightning.pytorch.strategies import FSDPStrategy

# Lightning's DDP launchers, each registered with a `_find_unused_parameters_true` variant
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def fsdp(
    wrap_layers: list[str],
    sharding_strategy: str = "FULL_SHARD",
    state_dict_type: str = "full",
    **kwargs,
) -> FSDPStrategy:
    """FSDP with one shard unit per listed layer class (the decoder blocks, the encoders'
    layers). Activation checkpointing is not set here: the context config's
    `activation_checkpointing` has already wrapped those same blocks in `configure_model`,
    which Lightning runs before it shards, so each block is checkpointed inside its unit.
    `state_dict_type="full"` gathers single-file checkpoints that herd-eval and herd-export
    read on any machine."""
    return FSDPStrategy(
        auto_wrap_policy={get_class(name) for name in wrap_layers},
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        **kwargs,
    )


def strategy_override(strategy, system) -> dict:
    """{"strategy": ...} to build the trainer with for `system`, or {} to keep the config's:
    DDP's variant that looks for unused parameters when the system's steps may leave some
    out (a fusion batch without images skips the cross-attention layers), which plain DDP
    stops on."""
    if getattr(system, "skips_parameters", False) and strategy in DDP_STRATEGIES:
        return {"strategy": f"{strategy}_find_unused_parameters_true"}
    return {}
