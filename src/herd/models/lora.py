"""Low-rank adapters (LoRA, Hu et al. 2021) for the decoder's linear projections.

A `LoRALinear` *is* the `nn.Linear` it replaces (same `weight`, same parameter name), plus
two small matrices: y = x W^T + (alpha / r) * (x A^T) B^T. B starts at zero, so a freshly
adapted model computes exactly what the original did. `merge_lora` folds B A into W and
turns every adapter back into a plain `nn.Linear`, for export or fast inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.errors import ConfigError

# The decoder's projections that can carry adapters (attention and SwiGLU MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        # Take over `base`'s parameters without copying them (they may be frozen or sharded).
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in]
        self.bias = base.bias
        self.rank, self.scale = rank, alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        low_rank = self.dropout(x) @ self.lora_a.T @ self.lora_b.T  # [..., out] through rank r
        return super().forward(x) + self.scale * low_rank

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def add_lora(
    module: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = LORA_TARGETS,
) -> int:
    """Replace every nn.Linear named in `targets` inside `module` with a LoRALinear, in
    place. Returns the number of adapted projections."""
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown or rank < 1:
        raise ConfigError(
            f"LoRA needs rank >= 1 (got {rank}) and targets among {list(LORA_TARGETS)}"
            + (f"; unknown: {sorted(unknown)}" if unknown else "")
            + "."
        )
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                replaced += 1
    return replaced


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRALinear inside `module` into a plain nn.Linear, in place."""
    merged = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                merged += 1
    return merged
