"""Llama 3.2 Vision (Hugging Face `mllama`) as released: image encoder, projector and a Llama
decoder with gated cross-attention layers, in herd's parts.

    pixel_values [B, I, T, 3, S, S], aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, T]
    -> MllamaVisionEncoder                        [B, I, T, P, Dv]  (P patches + class token)
    -> multi_modal_projector (Linear with bias)   [B, I, T, P, D] -> media [B, I*T*P, D]
    input_ids [B, L] (<|image|> = vocab_size, one of the decoder's extra input rows)
    -> decoder (herd Llama: the self-attention layers), with a GatedCrossAttention layer run
       in front of the self-attention layer that follows it in the release's numbering
    -> logits [B, L, vocab_size]

The release numbers all its decoder layers together (40 in 11B, cross-attention at 3, 8,
..., 38); herd's decoder holds the self-attention ones (32, the Llama 3.1 8B text model)
and the cross-attention layers sit beside it (`cross_attention.{j}`: run before decoder
layer j). `cross_attention_mask` [B, L, I, T] (1: token may see that tile, as transformers'
processor makes it: a token sees the image group it follows most recently) is expanded over
each tile's P tokens. Rows that see no tile follow the release: their MLP branch is zeroed,
their attention branch averages over all image tokens (`blind_rows_attend_all`). Without
pixel_values the cross-attention layers are skipped: the text model alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.fusion import FusionModel, build_fusion_model
from herd.models.llama import Llama, LlamaConfig
from herd.models.mllama_vision import (
    MLLAMA_MEAN,
    MLLAMA_STD,
    MllamaVisionConfig,
    MllamaVisionEncoder,
)
from herd.models.speech import SpeechEncoder
from herd.models.vision import GatedCrossAttention


@dataclass(frozen=True)
class MllamaConfig:
    text: LlamaConfig  # the self-attention layers only; extra_input_tokens holds <|image|>
    # positions of the cross-attention layers among all decoder layers, the release's numbering
    cross_attention_layers: tuple[int, ...]
    vision: MllamaVisionConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))
        total = self.num_decoder_layers
        ids = self.cross_attention_layers
        if sorted(set(ids)) != list(ids) or any(not 0 <= i < total for i in ids):
            raise ConfigError(
                f"cross_attention_layers {list(ids)} must be increasing positions among the "
                f"{total} decoder layers (self-attention + cross-attention)."
            )

    @property
    def num_decoder_layers(self) -> int:  # the release's num_hidden_layers
        return self.text.n_layers + len(self.cross_attention_layers)

    @property
    def image_token_id(self) -> int:
        return self.text.vocab_size

    def cross_attention_slots(self) -> list[int]:
        """For each cross-attention layer, the herd decoder layer it runs before: the number
        of self-attention layers in front of it (n_layers: after the last)."""
        return [i - k for k, i in enumerate(self.cross_attention_layers)]


class MllamaModel(nn.Module):
    def __init__(self, cfg: MllamaConfig):
        super().__init__()
        self.config = cfg
        text = cfg.text
        self.vision_model = MllamaVisionEncoder(cfg.vision)
        self.multi_modal_projector = nn.Linear(cfg.vision.output_dim, text.dim, bias=True)
        self.decoder = Llama(text)
        self.cross_attention = mllama_cross_attention(cfg)

    def fusion_modules(self) -> list[nn.Module]:
        """What the vision adapter adds to the text model (herd.systems.finetune)."""
        return [self.cross_attention, self.multi_modal_projector]

    def image_features(
        self,
        pixel_values: torch.Tensor,  # [B, I, T, 3, S, S]
        aspect_ratio_ids: torch.Tensor,  # [B, I]
        aspect_ratio_mask: torch.Tensor,  # [B, I, T]
    ) -> torch.Tensor:  # -> [B, I*T*P, D]
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.multi_modal_projector(features).flatten(1, 3)

    def hidden_states(
        self,
        input_ids: torch.Tensor,  # [B, L]
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,  # [B, L, I, T] 0/1
    ) -> torch.Tensor:  # -> [B, L, D], final-normed
        before = {}
        if pixel_values is not None:
            if aspect_ratio_ids is None:
                raise ConfigError("pixel_values need aspect_ratio_ids (the image processor's).")
            if aspect_ratio_mask is None:
                aspect_ratio_mask = torch.ones(pixel_values.shape[:3], dtype=torch.long)
            media = self.image_features(
                pixel_values, aspect_ratio_ids, aspect_ratio_mask.to(pixel_values.device)
            )  # [B, N, D]
            allowed = None
            if cross_attention_mask is not None:
                P = self.config.vision.num_patches
                allowed = cross_attention_mask.bool().repeat_interleave(P, dim=3)  # [B,L,I,T*P]
                allowed = allowed.flatten(2)  # [B, L, N]
            for j, layer in self.cross_attention.items():
                before[int(j)] = partial(layer, media=media, media_mask=allowed)
        return self.decoder.hidden_states(input_ids, before_layers=before)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L]
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,  # [B, L] 1 = token; right padding only
    ) -> torch.Tensor:  # -> logits [B, L, vocab_size]
        if attention_mask is not None:
            real = attention_mask.bool()
            # right padding: once a row has padded, it stays padding (causal attention then
            # leaves every real token as it would be alone)
            if (real[:, 1:] & ~real[:, :-1]).any():
                raise ConfigError(
                    "attention_mask has padding before real tokens; pad on the right "
                    "(processor(..., padding_side='right'))."
                )
        hidden = self.hidden_states(
            input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask
        )
        return self.decoder.lm_head(hidden)


def mllama_cross_attention(cfg: MllamaConfig) -> nn.ModuleDict:
    """The release's cross-attention layers, keyed by the herd decoder layer they precede."""
    text = cfg.text
    return nn.ModuleDict(
        {
            str(j): GatedCrossAttention(
                text.dim,
                text.n_heads,
                text.n_kv_heads,
                text.ffn_dim,
                norm_eps=text.norm_eps,
                blind_rows_attend_all=True,
            )
            for j in cfg.cross_attention_slots()
        }
    )


@dataclass(frozen=True)
class MllamaImageInput:
    """What a fusion model built on the release fixes about its images (the fields the
    fusion stage reads of an image encoder's config): square RGB tiles of `img_size`."""

    img_size: int
    lm_dim: int
    in_chans: int = 3


class MllamaImageEncoder(nn.Module):
    """The released vision encoder and projector as a FusionModel image encoder.

    images [M, 3, S, S] in [-1, 1] (S: the tile size) -> [M, T*P, D]: each image is the one
    tile of the (1, 1) grid, as the release's processor prepares a square image of that
    size (aspect-ratio id 1, the other T-1 tile slots padding). `token_mask` marks the real
    tile's P tokens, the only ones a text row that follows the image sees; a row before any
    image attends to all T*P, as in the release (GatedCrossAttention blind_rows_attend_all).
    Image slots that pad a batch stay zero here, where the release would encode blank
    padding images (which only such blind rows would see)."""

    def __init__(self, vision_model: MllamaVisionEncoder, projector: nn.Linear):
        super().__init__()
        self.vision_model = vision_model
        self.multi_modal_projector = projector
        vision = vision_model.config
        self.vision_config = vision
        self.config = MllamaImageInput(vision.image_size, projector.out_features)
        self.feature_dim = vision.output_dim
        real = torch.zeros(vision.max_num_tiles, vision.num_patches, dtype=torch.bool)
        real[0] = True
        self.register_buffer("token_mask", real.flatten(), persistent=False)  # [T*P]
        self.register_buffer("mean", torch.tensor(MLLAMA_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(MLLAMA_STD).view(3, 1, 1), persistent=False)

    @classmethod
    def fresh(cls, vision: MllamaVisionConfig, lm_dim: int) -> MllamaImageEncoder:
        """Untrained parts of this shape (a fusion checkpoint's weights load into them)."""
        return cls(MllamaVisionEncoder(vision), nn.Linear(vision.output_dim, lm_dim, bias=True))

    def forward(
        self,
        images: torch.Tensor,  # [M, 3, S, S] in [-1, 1]
        projection: nn.Module | None = None,  # unused: the release's projector maps to D
    ) -> torch.Tensor:  # -> [M, T*P, D]
        M, C, S, _ = images.shape
        vision = self.vision_config
        if C != 3 or S != vision.image_size:
            raise ConfigError(
                f"The released image encoder takes RGB tiles of {vision.image_size} px, got "
                f"images of {C} channel(s) and {S} px."
            )
        pixels = ((images + 1) / 2 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        tiles = pixels.new_zeros(M, 1, vision.max_num_tiles, 3, S, S)
        tiles[:, 0, 0] = pixels
        aspect_ratio_ids = torch.ones(M, 1, dtype=torch.long, device=images.device)
        aspect_ratio_mask = torch.zeros(M, 1, vision.max_num_tiles, dtype=torch.long)
        aspect_ratio_mask[:, :, 0] = 1
        features = self.vision_model(tiles, aspect_ratio_ids, aspect_ratio_mask.to(images.device))
        return self.multi_modal_projector(features[:, 0].flatten(1, 2))  # [M, T*P, D]

    def record(self) -> dict:
        """What rebuilds this encoder's shape (FusionSystem checkpoints)."""
        return {"vision": asdict(self.vision_config), "lm_dim": self.config.lm_dim}


def fusion_model_from_mllama(
    model: MllamaModel,
    speech_token_id: int,
    speech_encoder: SpeechEncoder | None = None,
    speech_adapter: dict | None = None,
    speech_augment: nn.Module | None = None,
) -> FusionModel:
    """The release's parts (used as they are, not copied) as a FusionModel, with a speech
    encoder and a new speech adapter if given. A text token sees the image group it
    follows most recently, as the release's processor masks it."""
    return build_fusion_model(
        model.decoder,
        model.config.image_token_id,
        speech_token_id,
        image_encoder=MllamaImageEncoder(model.vision_model, model.multi_modal_projector),
        speech_encoder=speech_encoder,
        speech_adapter=speech_adapter,
        speech_augment=speech_augment,
        cross_attention=model.cross_attention,
    )


def mllama_from_fusion_model(model: FusionModel) -> MllamaModel:
    """The inverse of `fusion_model_from_mllama`: a fusion model built on the release, as
    the release's model (its parts shared, not copied), e.g. to write it back in the
    released layout (herd.models.pretrained_mllama.save_hf_mllama)."""
    encoder = model.image_encoder
    if not isinstance(encoder, MllamaImageEncoder) or model.speech_encoder is not None:
        raise ConfigError(
            "Only a fusion model built on a Llama 3.2 Vision release, without a speech "
            "encoder, has the released layout."
        )
    slots = model.cross_attention_layers  # herd's: the decoder layer each one precedes
    cfg = MllamaConfig(
        model.decoder.config, [j + k for k, j in enumerate(slots)], encoder.vision_config
    )
    with torch.device("meta"):  # a shell: its parts are replaced by the model's own
        released = MllamaModel(cfg)
    released.vision_model = encoder.vision_model
    released.multi_modal_projector = encoder.multi_modal_projector
    released.decoder = model.decoder
    released.cross_attention = model.cross_attention
    return released


__all__ = [
    "MllamaConfig",
    "MllamaImageEncoder",
    "MllamaModel",
    "fusion_model_from_mllama",
    "mllama_cross_attention",
    "mllama_from_fusion_model",
]
