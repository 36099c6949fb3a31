"""The composed multimodal model: the Llama decoder, seeing images through gated
cross-attention and hearing speech through embeddings spliced into its input.

    tokens [B, T] with <|image|> and runs of <|speech|> placeholders
    images [B, C, H, W] -> ImageEncoder -> media [B, N, D]
        -> cross-attention layers before every k-th decoder layer; text from the
           <|image|> token on sees the image, text before it does not
    audio [B, S] -> SpeechEncoder -> SpeechAdapter -> speech [B, L, D], one per 80 ms
        -> replaces the embeddings of the <|speech|> placeholders, in order
    -> decoder -> hidden [B, T, D] -> logits [B, T, V]

Either encoder may be absent. A sample with no image and no audio computes exactly what
the decoder alone computes while the cross-attention gates are 0 (and afterwards too: its
text rows see no image). Parameter names stay those of the parts (`decoder.layers.3.
self_attn.q_proj.weight`, `decoder.layers.3.cross_attn.*`, `image_encoder.*`,
`speech_encoder.*`, `speech_adapter.*`), so each stage's weights load into it by prefix.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import Llama, sample_next_token
from herd.models.speech import SpeechAdapter, SpeechAdapterConfig, SpeechEncoder
from herd.models.vision import ImageEncoder, add_vision_adapter


class FusionModel(nn.Module):
    def __init__(
        self,
        decoder: Llama,
        image_token_id: int,
        speech_token_id: int,
        image_encoder: ImageEncoder | None = None,
        speech_encoder: SpeechEncoder | None = None,
        cross_attention_every: int = 4,
        speech_adapter: dict | None = None,  # SpeechAdapterConfig fields besides the widths
        speech_augment: nn.Module | None = None,  # on the log-mels, e.g. SpecAugment
    ):
        super().__init__()
        dim = decoder.config.dim
        self.decoder = decoder
        self.image_token_id, self.speech_token_id = image_token_id, speech_token_id
        self.image_encoder = image_encoder
        self.cross_attention_layers: list[int] = []
        if image_encoder is not None:
            if image_encoder.config.lm_dim != dim:
                # The vision stage projected to its own width; the fusion stage learns a new
                # projection into this decoder (the multi-layer features are what carry over).
                image_encoder.projection = nn.Linear(image_encoder.feature_dim, dim)
                image_encoder.config = replace(image_encoder.config, lm_dim=dim)
            self.cross_attention_layers = add_vision_adapter(
                decoder, every=cross_attention_every, freeze_language_model=False
            )
        self.speech_encoder = speech_encoder
        self.speech_adapter = None
        # training-time augmentation between the encoder's front end and its Conformer (a
        # module that is the identity in eval mode)
        self.speech_augment = speech_augment or nn.Identity()
        if speech_encoder is not None:
            adapter_cfg = SpeechAdapterConfig(
                **{
                    **(speech_adapter or {}),
                    "encoder_dim": speech_encoder.config.dim,
                    "lm_dim": dim,
                }
            )
            self.speech_adapter = SpeechAdapter(adapter_cfg)

    # -- inputs ----------------------------------------------------------------------------

    def speech_tokens(self, num_samples: int) -> int:
        """Placeholders a clip of `num_samples` samples needs: one per adapter output."""
        if self.speech_encoder is None:
            raise ConfigError("This fusion model has no speech encoder; drop the speech tasks.")
        frames = self.speech_encoder.front_end.frame_lengths(torch.tensor([num_samples]))
        encoded = (frames // self.speech_encoder.config.stack).clamp(min=1)
        return int(SpeechAdapter.output_lengths(encoded)[0])

    def embed(
        self,
        tokens: torch.Tensor,  # [B, T]
        audio: torch.Tensor | None = None,  # [B, S]
        audio_lengths: torch.Tensor | None = None,  # [B], 0 for a sample without audio
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with the speech placeholders replaced by speech."""
        embeds = self.decoder.embed_tokens(tokens)  # [B, T, D]
        placeholders = tokens == self.speech_token_id  # [B, T]
        if audio is None or not placeholders.any():
            return embeds
        if self.speech_encoder is None:
            raise ConfigError("A sample has speech but this fusion model has no speech encoder.")
        has_audio = audio_lengths > 0
        features, frame_lengths = self.speech_encoder.features(
            audio[has_audio], audio_lengths[has_audio]
        )  # [B', F, n_mels]
        hidden, lengths = self.speech_encoder.encode(self.speech_augment(features), frame_lengths)
        speech, lengths = self.speech_adapter(hidden, lengths)  # [B', L, D], [B']
        real = torch.arange(speech.shape[1], device=tokens.device)[None] < lengths[:, None]
        wanted, given = placeholders.sum(dim=1)[has_audio], lengths
        if not torch.equal(wanted, given):
            raise ValueError(
                f"Speech placeholders per sample {wanted.tolist()} != speech embeddings "
                f"{given.tolist()}; build prompts with FusionModel.speech_tokens()."
            )
        embeds = embeds.clone()
        embeds[placeholders] = speech[real].to(embeds.dtype)  # row-major order on both sides
        return embeds

    def image_media(
        self,
        tokens: torch.Tensor,  # [B, T]
        media: torch.Tensor | None,  # [B, N, D]: the image encoder's output
        has_image: torch.Tensor | None = None,  # [B] bool (None: every sample has one)
        position_offset: int = 0,  # absolute position of tokens[:, 0] (cached decoding)
        image_position: torch.Tensor | None = None,  # [B], when <|image|> is not in tokens
    ) -> dict:
        """{"media": [B, N, D], "media_mask": [B, T, N]} for the decoder ({} without media).
        Text at and after a sample's first <|image|> token sees its image."""
        if media is None:
            return {}
        B, T = tokens.shape
        if image_position is None:
            image_position = first_position(tokens, self.image_token_id)  # [B] (T if none)
        positions = torch.arange(T, device=tokens.device) + position_offset  # [T]
        sees = positions[None, :] >= image_position[:, None]  # [B, T]
        if has_image is not None:
            sees = sees & has_image[:, None]
        return {"media": media, "media_mask": sees[:, :, None].expand(B, T, media.shape[1])}

    def encode_images(
        self, images: torch.Tensor | None, has_image: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """images [B, C, H, W] -> media [B, N, D]; rows without an image are not encoded
        (their media stay zero and no text row attends to them)."""
        if images is None:
            return None
        if self.image_encoder is None:
            raise ConfigError("A sample has an image but this fusion model has no image encoder.")
        if has_image is None or bool(has_image.all()):
            return self.image_encoder(images)  # [B, N, D]
        encoded = self.image_encoder(images[has_image])  # [B', N, D]
        media = encoded.new_zeros(images.shape[0], *encoded.shape[1:])
        media[has_image] = encoded
        return media

    # -- forward ---------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T]
        images: torch.Tensor | None = None,  # [B, C, H, W]
        has_image: torch.Tensor | None = None,  # [B] bool
        audio: torch.Tensor | None = None,  # [B, S]
        audio_lengths: torch.Tensor | None = None,  # [B]
    ) -> torch.Tensor:  # [B, T, D]
        return self.decoder.hidden_states(
            tokens,
            inputs_embeds=self.embed(tokens, audio, audio_lengths),
            **self.image_media(tokens, self.encode_images(images, has_image), has_image),
        )

    def forward(self, tokens: torch.Tensor, **inputs) -> torch.Tensor:  # -> logits [B, T, V]
        return self.decoder.lm_head(self.hidden_states(tokens, **inputs))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,  # [1, T0]
        max_new_tokens: int,
        stop_ids: tuple[int, ...] = (),
        images: torch.Tensor | None = None,  # [1, C, H, W]
        audio: torch.Tensor | None = None,  # [1, S]
        temperature: float = 0.0,
    ) -> list[int]:
        """Greedy (or sampled) continuation of one prompt with a KV cache; returns the new
        token ids, without the stop token."""
        decoder, T0 = self.decoder, prompt.shape[1]
        total = min(T0 + max_new_tokens, decoder.config.max_seq_len)
        audio_lengths = None if audio is None else torch.tensor([audio.shape[-1]])
        media = self.encode_images(images)
        image_position = first_position(prompt, self.image_token_id)  # [1]
        tokens, embeds, start = prompt, self.embed(prompt, audio, audio_lengths), 0
        out: list[int] = []
        decoder.setup_cache(1, total)
        try:
            for _ in range(total - T0):
                extra = self.image_media(tokens, media, None, start, image_position)
                hidden = decoder.hidden_states(
                    tokens, cache_start=start, inputs_embeds=embeds, **extra
                )  # [1, T, D]
                nxt = int(sample_next_token(decoder.lm_head(hidden[:, -1]), temperature)[0])
                start += tokens.shape[1]
                if nxt in stop_ids:
                    break
                out.append(nxt)
                tokens, embeds = torch.tensor([[nxt]], device=prompt.device), None
        finally:
            decoder.clear_cache()
        return out


def first_position(tokens: torch.Tensor, token_id: int) -> torch.Tensor:
    """[B, T] -> [B]: index of the first `token_id` in each row (T where there is none)."""
    B, T = tokens.shape
    hits = tokens == token_id
    index = torch.arange(T, device=tokens.device).expand(B, T)
    return torch.where(hits, index, torch.full_like(index, T)).min(dim=1).values


__all__ = ["FusionModel", "first_position"]
