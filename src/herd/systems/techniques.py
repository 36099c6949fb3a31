"""Training techniques applied to a model's blocks in one place and one order:
activation checkpointing, then compile (FSDP wrapping, when chosen, follows in the strategy).
Model code never knows about them, and parameter names do not change, so checkpoints load
into a model trained with or without them."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from herd.errors import ConfigError

CHECKPOINTING_MODES = ("none", "attention", "selective", "full")

# What each selective mode keeps from the forward; everything else is recomputed in backward.
# attention: the attention kernels' outputs only, the one part whose cost grows with the
#   square of the length (a [T, dim] result per layer), so long rows recompute the linear
#   layers but never attention: nearly full checkpointing's memory, less of its time.
# selective: also every matmul's output, recomputing only elementwise ops (norms,
#   activations, RoPE).
_ATTENTION_OPS = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_SAVED_OPS = {
    "attention": _ATTENTION_OPS,
    "selective": _ATTENTION_OPS
    | {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default},
}


def _saving(ops: set):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _checkpoint_forward(block: nn.Module, mode: str) -> None:
    forward = block.forward
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _saving(_SAVED_OPS[mode]))
        if mode in _SAVED_OPS
        else None
    )

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and generation: nothing to save
            return forward(*args, **kwargs)
        # what selective modes keep goes through any surrounding saved-tensor hooks (e.g.
        # save_on_cpu), as torch will by default
        extra = (
            {"context_fn": context_fn, "respect_saved_tensors_hooks": True} if context_fn else {}
        )
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    block.forward = checkpointed


def check_checkpointing_mode(mode: str) -> None:
    if mode not in CHECKPOINTING_MODES:
        raise ConfigError(
            f"activation_checkpointing={mode!r} is unknown; use one of {CHECKPOINTING_MODES}."
        )


def apply_training_techniques(
    blocks: nn.ModuleList, activation_checkpointing: str = "none", compile: bool = False
) -> None:
    """Checkpoint and/or compile each block of `blocks` in place (idempotent)."""
    check_checkpointing_mode(activation_checkpointing)
    for block in blocks:
        if getattr(block, "_herd_techniques", None):
            continue
        if activation_checkpointing != "none":
            _checkpoint_forward(block, activation_checkpointing)
        if compile:
            block.compile()
        block._herd_techniques = (activation_checkpointing, compile)
