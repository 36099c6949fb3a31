"""Which parts of a fusion model train: the fine-tuning strategies a study compares.

    full     everything trains
    partial  encoders + adapters + the top `top_layers` decoder layers (and the final norm)
    adapter  the paper's recipe: decoder frozen; encoders and adapters train
    lora     decoder frozen, rank-r LoRA on its attention and MLP projections trains;
             encoders and adapters train (merge with herd.models.lora.merge_lora to export)

"Adapters" are the cross-attention layers inside the decoder (`*.cross_attn.*`) and the
speech adapter.
"""

from __future__ import annotations

from torch import nn

from herd.errors import ConfigError
from herd.models.fusion import FusionModel
from herd.models.lora import add_lora

STRATEGIES = ("full", "partial", "adapter", "lora")


def is_decoder_core(name: str) -> bool:
    """A parameter of the language model itself (not an adapter inside it, not LoRA)."""
    return name.startswith("decoder.") and ".cross_attn." not in name and ".lora_" not in name


def apply_finetune_strategy(
    model: FusionModel,
    strategy: str = "full",
    top_layers: int = 2,
    lora: dict | None = None,
) -> dict[str, int]:
    """Set requires_grad for `strategy` (adding LoRA matrices first for `lora`); returns
    {"trainable": n, "frozen": n} parameter counts."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"finetune.strategy={strategy!r} is not one of {list(STRATEGIES)}.")
    layers = model.decoder.layers
    if strategy == "partial" and not 0 <= top_layers <= len(layers):
        raise ConfigError(
            f"finetune.top_layers={top_layers} must be between 0 and the decoder's "
            f"{len(layers)} layers."
        )
    if strategy == "lora":
        for layer in layers:  # the decoder's own projections, not the cross-attention's
            add_lora(layer.self_attn, **(lora or {}))
            add_lora(layer.mlp, **(lora or {}))

    top = {f"decoder.layers.{i}." for i in range(len(layers) - top_layers, len(layers))}
    for name, p in model.named_parameters():
        if not is_decoder_core(name) or strategy == "full":
            trains = True  # encoders, adapters and LoRA matrices train under every strategy
        elif strategy == "partial":
            trains = name.startswith("decoder.norm.") or any(name.startswith(t) for t in top)
        else:  # adapter, lora: the language model itself is frozen
            trains = False
        p.requires_grad_(trains)
    return parameter_counts(model)


def parameter_counts(module: nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts
