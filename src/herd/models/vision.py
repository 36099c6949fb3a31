"""The Llama 3 vision parts, read top to bottom.

    images [B, C, H, W]
      -> timm backbone (any model with `forward_intermediates`: ViT by default, CNN ablation)
      -> feature maps of the configured intermediate layers + the final one, each on one
         common grid of N = h x w cells:               [B, C_i, h, w] ... , [B, C_f, h, w]
      -> final tokens through extra gated self-attention layers  [B, N, C_f]
      -> concatenated along channels                  [B, N, C_1 + ... + C_f]
      -> LayerNorm -> linear projection               [B, N, lm_dim]   ("media" tokens)

    media [B, N, D] -> GatedCrossAttention before every k-th decoder layer of the language
    model: x = x + tanh(g_attn) * CrossAttn(x, media);  x = x + tanh(g_mlp) * MLP(x)

Both gates (TanhGate modules) start at 0, so an untrained adapter leaves the language
model's outputs exactly unchanged (bit for bit). The cross-attention layers are not put
inside the decoder: herd.models.fusion.build_fusion_model holds them beside it and runs
each before its decoder layer, so the language model is never modified.

Plain single-device PyTorch: no Lightning, no Hydra. Shape legend: B batch, C channels,
H x W image size, h x w token grid, N = h * w image tokens, T text tokens, D language
model width, F concatenated feature width, H/K query/key-value heads, Hd head dim.

Usage (the fusion stage, see herd.models.fusion):

    encoder = ImageEncoder(ImageEncoderConfig(backbone="vit_tiny_patch16_224", lm_dim=256))
    media = encoder(images)                            # [B, N, D]
    cross = GatedCrossAttention(256, n_heads=4, n_kv_heads=2, ffn_dim=768)
    x = cross(x, media, media_mask)                    # [B, T, D], before decoder layer i
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import timm
import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import FeedForward, RMSNorm, attention

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Architecture of an ImageEncoder. Validated on construction (and against the backbone
    when the encoder is built).

    Args:
        backbone: a timm model name; always built with pretrained=False (no network).
        img_size: square input side in pixels.
        in_chans: image channels the backbone takes (1 grayscale, 3 RGB).
        patch_size: ViT patch side (None keeps the model's own); ignored by CNNs.
        backbone_kwargs: further timm.create_model arguments (e.g. embed_dim, depth, num_heads).
        feature_layers: 0-indexed entries of the backbone's `feature_info` (ViT: blocks;
            CNN: stages) whose outputs are concatenated with the final features.
        token_grid: side of the common token grid every feature map is pooled to; None keeps
            the final feature map's grid (a ViT's patch grid). CNNs need it: their last stage
            is tiny (1 x 1 at 32 px).
        n_gated_layers: extra gated self-attention layers over the final features.
        gated_heads: heads of those layers (must divide the backbone's final width).
        lm_dim: width of the language model the tokens are projected to.
    """

    backbone: str = "vit_tiny_patch16_224"
    img_size: int = 32
    in_chans: int = 1
    patch_size: int | None = 4
    backbone_kwargs: dict = field(default_factory=dict)
    feature_layers: tuple[int, ...] = (3, 7)
    token_grid: int | None = None
    n_gated_layers: int = 0
    gated_heads: int = 4
    lm_dim: int = 256

    def __post_init__(self) -> None:
        # from YAML: lists and DictConfigs become tuples and dicts
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs or {}))
        where = f"image encoder {self.backbone!r}"
        for name in ("img_size", "in_chans", "gated_heads", "lm_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}.")
        if self.patch_size is not None and self.patch_size <= 0:
            raise ConfigError(f"{where}: patch_size must be positive, got {self.patch_size}.")
        if self.token_grid is not None and self.token_grid <= 0:
            raise ConfigError(f"{where}: token_grid must be positive, got {self.token_grid}.")
        if self.n_gated_layers < 0:
            raise ConfigError(f"{where}: n_gated_layers must be >= 0, got {self.n_gated_layers}.")
        layers = self.feature_layers
        if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ConfigError(
                f"{where}: feature_layers {list(layers)} must be distinct 0-indexed layers (>= 0)."
            )
        if list(layers) != sorted(layers):
            raise ConfigError(
                f"{where}: feature_layers {list(layers)} must be in increasing order."
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "feature_layers": list(self.feature_layers)}


# ----------------------------------------------------------------------------- encoder


class TanhGate(nn.Module):
    """x -> tanh(g) * x for one learned scalar g, initialised to 0: the branch it gates
    adds nothing until training opens it. A module of its own, so that the gates can be
    found (and given their own learning rate) by type rather than by parameter name."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate.tanh() * x


class GatedSelfAttentionBlock(nn.Module):
    """Pre-norm Transformer block whose two residual branches are scaled by tanh(gate);
    gates start at 0, so a new block is the identity and grows in as it learns."""

    def __init__(self, dim: int, n_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.n_heads = n_heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.attn_gate, self.mlp_gate = TanhGate(), TanhGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, N, C]
        B, N, C = x.shape
        qkv = self.qkv(self.attn_norm(x)).view(B, N, 3, self.n_heads, C // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, C/heads]
        attn = attention(q, k, v)  # image tokens see each other: no mask
        attn = attn.transpose(1, 2).reshape(B, N, C)
        x = x + self.attn_gate(self.out_proj(attn))
        return x + self.mlp_gate(self.mlp(self.mlp_norm(x)))


class ImageEncoder(nn.Module):
    """images [B, in_chans, img_size, img_size] -> media tokens [B, N, lm_dim].

    `intermediates(images)` gives the per-layer feature maps before they are concatenated
    (see its docstring for shapes); `feature_dim` is the concatenated width F and
    `num_tokens` the token count N.
    """

    token_mask = None  # every media token is real (an encoder with padding sets [N] bool)

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.config = cfg
        self.backbone = _create_backbone(cfg)
        if not hasattr(self.backbone, "forward_intermediates"):
            raise ConfigError(
                f"timm backbone {cfg.backbone!r} has no forward_intermediates(); pick one that does "
                "(ViT, DeiT, ResNet, ConvNeXt, EfficientNet, ...)."
            )
        feature_info = _feature_channels(self.backbone)  # channels of every selectable layer
        too_deep = [i for i in cfg.feature_layers if i >= len(feature_info)]
        if too_deep:
            raise ConfigError(
                f"image encoder {cfg.backbone!r} has {len(feature_info)} feature layers "
                f"(0..{len(feature_info) - 1}); feature_layers {too_deep} are out of range."
            )
        final_dim = self.backbone.num_features
        if final_dim % cfg.gated_heads and cfg.n_gated_layers:
            raise ConfigError(
                f"image encoder {cfg.backbone!r}: gated_heads {cfg.gated_heads} does not divide "
                f"the final feature width {final_dim}."
            )
        self.layer_dims = [feature_info[i] for i in cfg.feature_layers] + [final_dim]
        self.feature_dim = sum(self.layer_dims)  # F
        self.gated_layers = nn.ModuleList(
            GatedSelfAttentionBlock(final_dim, cfg.gated_heads) for _ in range(cfg.n_gated_layers)
        )
        self.norm = nn.LayerNorm(self.feature_dim)
        self.projection = nn.Linear(self.feature_dim, cfg.lm_dim)
        self.num_prefix_tokens = getattr(self.backbone, "num_prefix_tokens", 0)

    @property
    def num_tokens(self) -> int:
        """N image tokens per image at the configured img_size."""
        if self.config.token_grid:
            return self.config.token_grid**2
        h, w = self._final_grid((self.config.img_size, self.config.img_size))
        return h * w

    def _final_grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        patch_embed = getattr(self.backbone, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size(image_hw))
        reduction = self.backbone.feature_info[-1]["reduction"]
        return (math.ceil(image_hw[0] / reduction), math.ceil(image_hw[1] / reduction))

    def intermediates(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images [B, C, H, W] -> (maps, final) before pooling to the token grid:
        maps: one [B, C_i, h_i, w_i] per feature layer (ViT: C_i = embed_dim, h_i x w_i the
        patch grid; CNN: the stage's channels at H/r_i x W/r_i for its reduction r_i);
        final: [B, C_f, h_f, w_f], the backbone's last (normed) features, class/register
        tokens of a ViT dropped."""
        final, maps = self.backbone.forward_intermediates(
            images, indices=list(self.config.feature_layers), output_fmt="NCHW"
        )
        if not self.config.feature_layers:
            maps = []
        if final.ndim == 3:  # ViT-style tokens [B, prefix + h*w, C_f]
            tokens = final[:, self.num_prefix_tokens :]  # [B, h*w, C_f]
            h, w = self._final_grid(tuple(images.shape[-2:]))
            final = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        elif final.shape[1] != self.backbone.num_features:  # NHWC final features (e.g. Swin)
            final = final.permute(0, 3, 1, 2)
        return list(maps), final  # [B, C_i, h_i, w_i] each, [B, C_f, h_f, w_f]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> concatenated multi-layer features [B, N, F] (before projection)."""
        maps, final = self.intermediates(images)
        grid = self.config.token_grid
        grid_hw = (grid, grid) if grid else tuple(final.shape[-2:])

        def to_tokens(fmap: torch.Tensor) -> torch.Tensor:  # [B, C, h_i, w_i] -> [B, N, C]
            if tuple(fmap.shape[-2:]) != grid_hw:
                # average where the map is finer, repeat cells where it is coarser
                fmap = F.adaptive_avg_pool2d(fmap, grid_hw)
            return fmap.flatten(2).transpose(1, 2)

        final_tokens = to_tokens(final)  # [B, N, C_f]
        for layer in self.gated_layers:
            final_tokens = layer(final_tokens)
        return torch.cat([*(to_tokens(m) for m in maps), final_tokens], dim=-1)  # [B, N, F]

    def forward(
        self, images: torch.Tensor, projection: nn.Linear | None = None
    ) -> torch.Tensor:  # [B, C, H, W] -> [B, N, lm_dim] (or projection's width)
        """`projection` replaces the encoder's own (the fusion model's, into a decoder of
        another width than the vision stage projected to)."""
        return (projection or self.projection)(self.norm(self.features(images)))


def _create_backbone(cfg: ImageEncoderConfig) -> nn.Module:
    """The timm model, never pretrained (no network), without its classifier head."""
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": cfg.in_chans}
    kwargs.update(cfg.backbone_kwargs)
    # Transformers fix their position embeddings (and patches) at construction; CNNs take
    # any image size and refuse these arguments.
    sized = {"img_size": cfg.img_size}
    if cfg.patch_size is not None:
        sized["patch_size"] = cfg.patch_size
    try:
        try:
            return timm.create_model(cfg.backbone, **kwargs, **sized)
        except TypeError:
            return timm.create_model(cfg.backbone, **kwargs)
    except (RuntimeError, TypeError) as exc:  # unknown model name, unknown argument
        raise ConfigError(f"timm could not build backbone {cfg.backbone!r}: {exc}") from exc


def _feature_channels(backbone: nn.Module) -> list[int]:
    info = backbone.feature_info
    if hasattr(info, "channels"):  # a timm FeatureInfo
        return list(info.channels())
    return [entry["num_chs"] for entry in info]


# ----------------------------------------------------------------------------- adapter


def cross_attention_layer_ids(n_layers: int, every: int) -> list[int]:
    """The decoder layers a cross-attention layer runs before: every-1, 2*every-1, ...
    (every=4 on 32 layers: 3, 7, ..., 31, as in the Llama 3 paper)."""
    if every <= 0:
        raise ConfigError(f"cross-attention every={every}: must be a positive number of layers.")
    return list(range(every - 1, n_layers, every))


class GatedCrossAttention(nn.Module):
    """Text tokens attend to image tokens: GQA with RMSNorm on queries and keys (per head),
    no RoPE (image tokens have no text position), and a SwiGLU MLP; both branches are scaled
    by tanh of a scalar gate that starts at 0.

    A text row that may see no image token (media_mask all False for it) gets no update from
    either branch, so text before its image is exactly as the language model alone sees it.
    Llama 3.2 Vision as released zeroes only the MLP branch of such a row; its attention
    branch then averages over every image token. `blind_rows_attend_all=True` computes that,
    for the released weights (herd.models.mllama).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        ffn_dim: int,
        media_dim: int | None = None,
        norm_eps: float = 1e-5,
        blind_rows_attend_all: bool = False,
    ):
        super().__init__()
        self.blind_rows_attend_all = blind_rows_attend_all
        if dim % n_heads or n_heads % n_kv_heads:
            raise ConfigError(
                f"cross-attention: dim {dim} must divide by n_heads {n_heads}, and n_heads by "
                f"n_kv_heads {n_kv_heads}."
            )
        media_dim = media_dim or dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(media_dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(media_dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, norm_eps)
        self.k_norm = RMSNorm(self.head_dim, norm_eps)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = FeedForward(dim, ffn_dim)
        self.attn_gate, self.mlp_gate = TanhGate(), TanhGate()
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.attn_gate.gate)
        nn.init.zeros_(self.mlp_gate.gate)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D] text hidden states
        media: torch.Tensor,  # [B, N, D_media] image tokens
        media_mask: torch.Tensor | None = None,  # [B, N] or [B, T, N] bool, True = may attend
    ) -> torch.Tensor:
        B, T, _ = x.shape
        N = media.shape[1]
        q = self.q_proj(self.input_layernorm(x)).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(media).view(B, N, self.n_kv_heads, self.head_dim)
        v = self.v_proj(media).view(B, N, self.n_kv_heads, self.head_dim)
        q = self.q_norm(q).transpose(1, 2)  # [B, H, T, Hd]
        k = self.k_norm(k).transpose(1, 2)  # [B, K, N, Hd]
        v = v.transpose(1, 2)  # [B, K, N, Hd]

        sees_media = None  # [B, T, 1]: rows with at least one visible image token
        mask = None
        if media_mask is not None:
            allowed = media_mask.to(torch.bool)
            allowed = allowed[:, None, :].expand(B, T, N) if allowed.ndim == 2 else allowed
            sees_media = allowed.any(dim=-1, keepdim=True)  # [B, T, 1]
            # A row that sees nothing would be softmax over -inf (NaN); let it see everything
            # and zero its output below instead.
            mask = (allowed | ~sees_media)[:, None]  # [B, 1, T, N]
        out = attention(q, k, v, mask, enable_gqa=self.n_heads != self.n_kv_heads)  # [B, H, T, Hd]
        attn = self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        if sees_media is not None and not self.blind_rows_attend_all:
            attn = attn * sees_media  # [B, T, D]
        x = x + self.attn_gate(attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        if sees_media is not None:
            mlp = mlp * sees_media
        return x + self.mlp_gate(mlp)  # [B, T, D]


__all__ = [
    "GatedCrossAttention",
    "GatedSelfAttentionBlock",
    "ImageEncoder",
    "ImageEncoderConfig",
    "TanhGate",
    "cross_attention_layer_ids",
]
