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

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import Llama, LlamaConfig
from herd.models.mllama_vision import MllamaVisionConfig, MllamaVisionEncoder
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
        self.cross_attention = nn.ModuleDict(
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


__all__ = ["MllamaConfig", "MllamaModel"]
