"""The Llama 3 video adapter's parts: a temporal aggregator that merges consecutive frames,
and where the video cross-attention layers go.

    frames [B, F, C, H, W] (frame_mask [B, F]) -> ImageEncoder, frame by frame -> [B, F, N, D]
        -> + a learned embedding of each frame's index (cross-attention has no positions)
        -> groups of G consecutive frames [B * F/G, G * N, D]
        -> TemporalAggregator: L latents cross-attend over the group's tokens (and
           themselves), a perceiver resampler -> video tokens [B, F/G, L, D]; each group's
           latents start from its mean frame (pooled to L tokens) plus a learned latent
           and a learned embedding of the group's place in time
        -> GatedCrossAttention layers, one before every k-th image cross-attention layer

The Llama 3 paper merges 32 frames into one and reads up to 64 frames; the digits world's
clips are 8-42 frames (herd.data.video_digits) and G is a config choice
(model.video.frames_per_group). A group whose frames are all padding gets group_mask False,
and no text row may attend to its tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import FeedForward, RMSNorm, attention


@dataclass(frozen=True)
class TemporalAggregatorConfig:
    """dim: the image encoder's token width (its projection's, the decoder's);
    frames_per_group: G consecutive frames merged into one group; n_latents: L tokens out
    per group; max_frames: the longest clip (frame-index embeddings)."""

    dim: int
    frames_per_group: int = 4
    n_latents: int = 16
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: int | None = None  # None: 4 x dim
    max_frames: int = 64
    norm_eps: float = 1e-5

    def __post_init__(self):
        where = "temporal aggregator"
        for name in ("dim", "frames_per_group", "n_latents", "n_layers", "n_heads", "max_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ConfigError(f"{where}: dim {self.dim} must divide by n_heads {self.n_heads}.")

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 4 * self.dim


class PerceiverLayer(nn.Module):
    """Latents attend to [media; latents] (keys padded out by key_mask), then a SwiGLU
    MLP; both pre-norm residual branches update the latents only."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.media_norm, self.latent_norm = RMSNorm(dim, norm_eps), RMSNorm(dim, norm_eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = FeedForward(dim, ffn_dim)

    def forward(
        self,
        latents: torch.Tensor,  # [M, L, D]
        media: torch.Tensor,  # [M, S, D]
        key_mask: torch.Tensor,  # [M, S] bool, True = a real frame's token
    ) -> torch.Tensor:  # [M, L, D]
        M, L, D = latents.shape
        normed = self.latent_norm(latents)
        context = torch.cat([self.media_norm(media), normed], dim=1)  # [M, S + L, D]
        k, v = self.kv_proj(context).chunk(2, dim=-1)  # [M, S + L, D] each
        q = self.q_proj(normed)  # [M, L, D]
        q, k, v = (
            t.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v)
        )
        # the latents are always keys, so every query has one: no all-masked row
        keys = torch.cat([key_mask, key_mask.new_ones(M, L)], dim=1)  # [M, S + L]
        h = attention(q, k, v, keys[:, None, None, :])  # [M, H, L, Hd]
        latents = latents + self.o_proj(h.transpose(1, 2).reshape(M, L, D))
        return latents + self.mlp(self.mlp_norm(latents))


class TemporalAggregator(nn.Module):
    """frame tokens [B, F, N, D] (frame_mask [B, F]) -> video tokens [B, ceil(F/G), L, D]
    and group_mask [B, ceil(F/G)] (True where a group holds a real frame)."""

    def __init__(self, cfg: TemporalAggregatorConfig):
        super().__init__()
        self.config = cfg
        self.frame_embed = nn.Parameter(torch.zeros(cfg.max_frames, cfg.dim))  # [F_max, D]
        # which group in time: the decoder's cross-attention sees the groups' tokens as a
        # set, so each group's latents start from its own place in the clip
        self.group_embed = nn.Parameter(torch.zeros(self.groups(cfg.max_frames), cfg.dim))
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, cfg.dim))  # [L, D]
        self.layers = nn.ModuleList(
            PerceiverLayer(cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.norm_eps)
            for _ in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # all small: the tokens out (normed) are then mostly what the latents read from the
        # frames, not their own starting values
        for start in (self.frame_embed, self.group_embed, self.latents):
            nn.init.normal_(start, std=std)

    def groups(self, n_frames: int) -> int:
        return math.ceil(n_frames / self.config.frames_per_group)

    def forward(
        self,
        frames: torch.Tensor,  # [B, F, N, D] encoded frames
        frame_mask: torch.Tensor | None = None,  # [B, F] bool, False = padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, n_frames, N, D = frames.shape
        cfg, G = self.config, self.config.frames_per_group
        if n_frames > cfg.max_frames:
            raise ValueError(
                f"A clip of {n_frames} frames is longer than the aggregator's max_frames="
                f"{cfg.max_frames}; sample fewer frames or raise max_frames."
            )
        if frame_mask is None:
            frame_mask = torch.ones(B, n_frames, dtype=torch.bool, device=frames.device)
        S = self.groups(n_frames)
        pad = S * G - n_frames  # the last group is filled up with masked frames
        x = frames + self.frame_embed[:n_frames, None, :].to(frames.dtype)  # [B, F, N, D]
        x = F.pad(x, (0, 0, 0, 0, 0, pad))  # [B, S*G, N, D]
        mask = F.pad(frame_mask, (0, pad), value=False)  # [B, S*G]
        x = x.reshape(B * S, G * N, D)  # the group's frames' tokens in time order
        key_mask = mask.reshape(B * S, G, 1).expand(-1, -1, N).reshape(B * S, G * N)
        # each group's latents start from its mean frame (over its real frames, the N tokens
        # pooled to L), so a fresh aggregator already passes on what the frames show
        real = mask.view(B * S, G, 1, 1).to(x.dtype)
        mean_frame = (x.view(B * S, G, N, D) * real).sum(1) / real.sum(1).clamp(min=1)
        pooled = F.adaptive_avg_pool1d(mean_frame.transpose(1, 2), cfg.n_latents)  # [B*S, D, L]
        start = self.latents[None] + self.group_embed[:S, None]  # [S, L, D]
        latents = pooled.transpose(1, 2) + start.to(x.dtype).repeat(B, 1, 1)  # [B*S, L, D]
        for layer in self.layers:
            latents = layer(latents, x, key_mask)
        tokens = self.norm(latents).view(B, S, cfg.n_latents, D)  # [B, S, L, D]
        group_mask = mask.view(B, S, G).any(dim=-1)  # [B, S]
        return tokens, group_mask


def video_cross_attention_layer_ids(image_layers: list[int], every: int) -> list[int]:
    """The decoder layers a video cross-attention layer runs before: that of every `every`-th
    image cross-attention layer (the every-th, 2*every-th, ...), ahead of the image one.
    The paper's every=4 on Llama 3's 8 image layers (3, 7, ..., 31): 15 and 31."""
    if every <= 0:
        raise ConfigError(f"video cross-attention every={every}: must be a positive count.")
    chosen = sorted(image_layers)[every - 1 :: every]
    if not chosen:
        raise ConfigError(
            f"video cross-attention every={every} picks none of the {len(image_layers)} image "
            "cross-attention layers; lower it."
        )
    return chosen


__all__ = [
    "PerceiverLayer",
    "TemporalAggregator",
    "TemporalAggregatorConfig",
    "video_cross_attention_layer_ids",
]
