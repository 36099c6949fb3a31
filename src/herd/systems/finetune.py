"""Which parts of a fusion model train: the fine-tuning strategies a study compares.

    full     everything trains
    partial  encoders + adapters + the top `top_layers` decoder layers (and the final norm)
    adapter  the paper's recipe: decoder frozen; encoders and adapters train
    lora     decoder frozen, rank-r LoRA on its attention and MLP projections trains;
             encoders and adapters train (merge with herd.models.lora.merge_lora to export)

Under any strategy, `frozen` names whole parts of the fusion model kept fixed (e.g. the
paper's video stage trains only the video adapter: `finetune=video`).

"Adapters" are what composing added (`FusionModel.fusion_modules()`: the cross-attention
layers, an image projection, the speech adapter); the decoder's core is the decoder's own
parameters, LoRA matrices excluded. Both are found by module, never by parameter name.
"""

from __future__ import annotations

from torch import nn

from herd.errors import ConfigError
from herd.models.fusion import FusionModel
from herd.models.lora import LoRALinear, add_lora

STRATEGIES = ("full", "partial", "adapter", "lora")
PARTS = (  # FusionModel's parts, by attribute name, that `frozen` may name
    "decoder",
    "image_encoder",
    "image_projection",
    "cross_attention",
    "speech_encoder",
    "speech_adapter",
    "video_aggregator",
    "video_cross_attention",
)


def decoder_core_parameters(model: FusionModel) -> list[nn.Parameter]:
    """The language model's own parameters (not LoRA matrices added to its projections)."""
    lora = {
        id(p)
        for m in model.decoder.modules()
        if isinstance(m, LoRALinear)
        for p in (m.lora_a, m.lora_b)
    }
    return [p for p in model.decoder.parameters() if id(p) not in lora]


def apply_finetune_strategy(
    model: FusionModel,
    strategy: str = "full",
    top_layers: int = 2,
    lora: dict | None = None,
    frozen: tuple[str, ...] | list[str] = (),
) -> dict[str, int]:
    """Set requires_grad for `strategy` (adding LoRA matrices first for `lora`), then
    freeze the `frozen` parts; returns {"trainable": n, "frozen": n} parameter counts."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"finetune.strategy={strategy!r} is not one of {list(STRATEGIES)}.")
    for part in frozen:
        if part not in PARTS:
            raise ConfigError(f"finetune.frozen names {part!r}, not one of {list(PARTS)}.")
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

    for p in model.parameters():  # encoders, adapters and LoRA matrices train under all
        p.requires_grad_(True)
    if strategy != "full":
        for p in decoder_core_parameters(model):
            p.requires_grad_(False)
    if strategy == "partial":
        for module in [*layers[len(layers) - top_layers :], model.decoder.norm]:
            for p in module.parameters():
                p.requires_grad_(True)
    for part in frozen:  # a part this model lacks is frozen already
        if getattr(model, part) is not None:
            getattr(model, part).requires_grad_(False)
    return parameter_counts(model)


def parameter_counts(module: nn.Module) -> dict[str, int]:
    counts = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts
