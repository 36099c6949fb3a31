"""The released Llama 3.2 Vision image encoder (Hugging Face `mllama`), in plain PyTorch.

An image arrives as up to `max_num_tiles` square tiles (herd.data.mllama_images) and leaves
as one feature vector per patch of every tile, ready for the decoder's cross-attention:

    pixel_values [B, I, T, 3, S, S]  (I images per sample, T tiles each, S px a tile)
    -> 14-px patches (a conv)                                    [B*I, T, P, D]  P = (S/14)^2
    -> + aspect-ratio embedding per tile, gated (pre-tile)
    -> a class token per tile                                    [B*I, T, P+1, D]
    -> + position embedding, its gate mixing a shared table with one per aspect ratio and tile
    -> LayerNorm, patches padded to a multiple of 8              [B*I, T, N, D]
    -> the local transformer (32 layers in the release) over all tiles of an image at once,
       collecting its outputs after `intermediate_layers` (3, 7, 15, 23, 30)
    -> LayerNorm, + aspect-ratio embedding per tile, gated (post-tile)
    -> the global transformer (8 layers, each residual branch behind a tanh gate)
    -> padding removed; the last output and the collected ones, concatenated per patch:
       [B, I, T, P+1, D * (1 + len(intermediate_layers))]  (7680 = 1280 * 6 in the release)

Attention inside an image: as the release computes it, only pairs of positions that are
*both* padding (padded patches, or tiles the image does not use) are masked; a real patch
still attends to padding. Parameter names are those of the released checkpoints
(`vision_model.*` there), so their state dict loads as it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# the normalisation of the released Llama 3.2 Vision processor (CLIP's), on pixels in [0, 1]
MLLAMA_MEAN = (0.48145466, 0.4578275, 0.40821073)
MLLAMA_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MllamaVisionConfig:
    hidden_size: int = 1280
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    intermediate_size: int = 5120
    image_size: int = 560  # a tile's side, in pixels
    patch_size: int = 14
    num_channels: int = 3
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    # (rows, cols) tile grids; aspect-ratio id k + 1 is the k-th (0: no image)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = field(
        default=((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    )

    def __post_init__(self) -> None:  # lists from JSON -> tuples
        object.__setattr__(
            self, "intermediate_layers_indices", tuple(self.intermediate_layers_indices)
        )
        object.__setattr__(
            self, "supported_aspect_ratios", tuple(tuple(r) for r in self.supported_aspect_ratios)
        )

    @property
    def num_patches(self) -> int:  # per tile, with the class token
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))

    def to_dict(self) -> dict:
        return asdict(self)


class AspectRatioEmbedding(nn.Module):
    """One learned vector per tile for each aspect ratio, added behind a tanh gate."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.dim = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, self.tiles * self.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x [N, T, L, D], aspect_ratio_ids [N]
        per_tile = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.dim)
        return x + per_tile * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """(1 - tanh g) * a position table shared by all tiles + tanh g * one table per aspect
    ratio and tile: a fresh gate (0) gives every tile the same positions."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.patches, self.dim = cfg.max_num_tiles, cfg.num_patches, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(cfg.hidden_size**-0.5 * torch.randn(self.patches, self.dim))
        self.tile_embedding = nn.Embedding(
            len(cfg.supported_aspect_ratios) + 1, self.tiles * self.patches * self.dim
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x [N, T, P+1, D]
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding.view(1, 1, self.patches, self.dim)
        per_tile = self.tile_embedding(aspect_ratio_ids)
        return x + gate * per_tile.reshape(-1, self.tiles, self.patches, self.dim)


class VisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.heads, dim = cfg.attention_heads, cfg.hidden_size
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = (
            proj(x).view(N, L, self.heads, D // self.heads).transpose(1, 2)  # [N, H, L, hd]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask [N, 1, L, L]
        return self.o_proj(out.transpose(1, 2).reshape(N, L, D))


class VisionLayer(nn.Module):
    """A pre-LayerNorm transformer layer (GELU MLP); gated layers scale each residual
    branch by tanh of a learned scalar (pi / 4 at initialisation)."""

    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(self.post_attention_layernorm(x))))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, n_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, gated) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        outputs = []  # after each layer
        for layer in self.layers:
            x = layer(x, mask)
            outputs.append(x)
        return x, outputs


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, D, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(D**-0.5 * torch.randn(D))
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(D)
        self.layernorm_post = nn.LayerNorm(D)
        self.transformer = VisionTransformer(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = VisionTransformer(cfg, cfg.num_global_layers, gated=True)

    def attention_mask(self, aspect_ratio_mask: torch.Tensor, length: int, dtype) -> torch.Tensor:
        """aspect_ratio_mask [N, T] (1: a tile of the image) -> additive mask [N, 1, T*L, T*L]
        that blocks exactly the pairs of padding positions (see the module docstring)."""
        N, T = aspect_ratio_mask.shape
        real = aspect_ratio_mask.bool()[:, :, None].expand(N, T, length).clone()  # [N, T, L]
        real[:, :, self.config.num_patches :] = False  # the patches padded to a multiple of 8
        padding = ~real.reshape(N, T * length)
        both = padding[:, :, None] & padding[:, None, :]  # [N, T*L, T*L]
        zero = torch.zeros((), dtype=dtype, device=aspect_ratio_mask.device)
        return torch.where(both, torch.finfo(dtype).min, zero)[:, None]

    def forward(
        self,
        pixel_values: torch.Tensor,  # [B, I, T, C, S, S]
        aspect_ratio_ids: torch.Tensor,  # [B, I]
        aspect_ratio_mask: torch.Tensor,  # [B, I, T]
    ) -> torch.Tensor:  # -> [B, I, T, P+1, output_dim]
        cfg = self.config
        B, M, T, C, S, _ = pixel_values.shape  # M images per sample
        N, D = B * M, cfg.hidden_size
        ids = aspect_ratio_ids.reshape(N)

        x = self.patch_embedding(
            pixel_values.reshape(N * T, C, S, S).to(self.class_embedding.dtype)
        )
        x = x.flatten(2).transpose(1, 2)  # [N*T, P, D]
        x = self.pre_tile_positional_embedding(x.reshape(N, T, -1, D), ids)
        x = torch.cat([self.class_embedding.expand(N * T, 1, D), x.reshape(N * T, -1, D)], dim=1)
        P1 = x.shape[1]  # patches + class token
        x = self.gated_positional_embedding(x.reshape(N, T, P1, D), ids)
        x = self.layernorm_pre(x)
        pad = (8 - P1 % 8) % 8
        x = F.pad(x, (0, 0, 0, pad))  # [N, T, L, D], L = P1 + pad
        L = P1 + pad
        mask = self.attention_mask(aspect_ratio_mask.reshape(N, T), L, x.dtype)

        x, outputs = self.transformer(x.reshape(N, T * L, D), mask)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(N, T, L, D), ids)
        x, _ = self.global_transformer(x.reshape(N, T * L, D), mask)

        # the collected layers, stacked on a last axis and flattened per patch (as released)
        collected = torch.stack([outputs[i] for i in cfg.intermediate_layers_indices], dim=-1)
        collected = collected.reshape(N, T, L, -1)[:, :, :P1]
        x = x.reshape(N, T, L, D)[:, :, :P1]
        return torch.cat([x, collected], dim=-1).reshape(B, M, T, P1, -1)


__all__ = ["MLLAMA_MEAN", "MLLAMA_STD", "MllamaVisionConfig", "MllamaVisionEncoder"]
