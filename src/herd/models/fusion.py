"""The composed multimodal model: the Llama decoder, seeing images through gated
cross-attention and hearing speech through embeddings spliced into its input.

    tokens [B, T] with one <|image|> per image and one run of <|speech|> per clip
    images [B, I, C, H, W] (image_mask [B, I]) -> ImageEncoder -> media [B, I, N, D]
        -> cross-attention layers before every k-th decoder layer; a text token sees the
           most recent image (group) before it, as in Llama 3.2 Vision (see image_spans)
    audio [B, K, S] (audio_lengths [B, K]) -> SpeechEncoder -> SpeechAdapter
        -> speech [clips, L, D], one per 80 ms; clip k's embeddings replace the k-th run of
           <|speech|> placeholders of its sample, in order
    -> decoder -> hidden [B, T, D] -> logits [B, T, V]

`build_fusion_model` composes it from the stage models without modifying any of them: the
cross-attention layers sit beside the decoder (`cross_attention.{i}`, run before decoder
layer i through `Llama.hidden_states(before_layers=...)`), and when the decoder is wider or
narrower than the vision stage projected to, a new `image_projection` maps the encoder's
multi-layer features into it. What fusion adds is `fusion_modules()`: the parts that are
new (cross-attention with its TanhGate modules, the image projection, the speech adapter).

Either encoder may be absent. A sample with no image and no audio computes exactly what
the decoder alone computes, with any gates (its text rows see no image). Parameter names
keep those of the parts (`decoder.*`, `image_encoder.*`, `speech_encoder.*`), so each
stage's weights load into it by prefix.

Which images a token sees: as Llama 3.2 Vision (Mllama) has it, text sees the image whose
<|image|> placeholder it follows most recently (a run of consecutive placeholders counts as
one group, all seen), and text before the first placeholder sees none. What a later text
needs of an earlier figure it must read through self-attention from the text that saw it
(the figure's caption), so how far back a figure lies matters as it does for text.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import Llama, sample_next_token
from herd.models.speech import SpeechAdapter, SpeechAdapterConfig, SpeechEncoder
from herd.models.vision import GatedCrossAttention, ImageEncoder, cross_attention_layer_ids


class FusionModel(nn.Module):
    """The parts, composed; build one with `build_fusion_model`."""

    def __init__(
        self,
        decoder: Llama,
        image_token_id: int,
        speech_token_id: int,
        image_encoder: ImageEncoder | None = None,
        image_projection: nn.Linear | None = None,  # None: the encoder's own projection
        cross_attention: nn.ModuleDict | None = None,  # {"i": GatedCrossAttention}
        speech_encoder: SpeechEncoder | None = None,
        speech_adapter: SpeechAdapter | None = None,
        speech_augment: nn.Module | None = None,  # on the log-mels in training (SpecAugment)
    ):
        super().__init__()
        if (image_encoder is None) != (cross_attention is None):
            raise ConfigError("An image encoder needs cross-attention layers, and vice versa.")
        if (speech_encoder is None) != (speech_adapter is None):
            raise ConfigError("A speech encoder needs a speech adapter, and vice versa.")
        self.decoder = decoder
        self.image_token_id, self.speech_token_id = image_token_id, speech_token_id
        self.image_encoder = image_encoder
        self.image_projection = image_projection
        self.cross_attention = cross_attention
        self.speech_encoder = speech_encoder
        self.speech_adapter = speech_adapter
        self.speech_augment = speech_augment or nn.Identity()  # the identity in eval mode

    @property
    def cross_attention_layers(self) -> list[int]:
        return sorted(int(i) for i in self.cross_attention or {})

    def fusion_modules(self) -> list[nn.Module]:
        """What composing added to the stage models (what the `adapter` strategy trains
        besides the encoders)."""
        parts = [self.cross_attention, self.image_projection, self.speech_adapter]
        return [m for m in parts if m is not None]

    # -- speech ----------------------------------------------------------------------------

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
        audio: torch.Tensor | None = None,  # [B, K, S]
        audio_lengths: torch.Tensor | None = None,  # [B, K], 0 where a sample has no clip k
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with the speech placeholders replaced by speech."""
        embeds = self.decoder.embed_tokens(tokens)  # [B, T, D]
        placeholders = tokens == self.speech_token_id  # [B, T]
        if audio is None or not placeholders.any():
            return embeds
        if self.speech_encoder is None:
            raise ConfigError("A sample has speech but this fusion model has no speech encoder.")
        real_clip = audio_lengths > 0  # [B, K]
        clips, clip_lengths = audio[real_clip], audio_lengths[real_clip]  # [M, S], [M]
        clips = clips[:, : int(clip_lengths.max())]
        features, frame_lengths = self.speech_encoder.features(clips, clip_lengths)
        hidden, lengths = self.speech_encoder.encode(self.speech_augment(features), frame_lengths)
        speech, lengths = self.speech_adapter(hidden, lengths)  # [M, L, D], [M]
        # clips are in (sample, clip) order, as are the placeholder runs: row-major on both
        per_sample = torch.zeros_like(audio_lengths)  # [B, K]
        per_sample[real_clip] = lengths
        wanted, given = placeholders.sum(dim=1), per_sample.sum(dim=1)  # [B]
        if not torch.equal(wanted, given):
            raise ValueError(
                f"Speech placeholders per sample {wanted.tolist()} != speech embeddings of "
                f"their clips {given.tolist()}; build prompts with FusionModel.speech_tokens()."
            )
        real = torch.arange(speech.shape[1], device=tokens.device)[None] < lengths[:, None]
        embeds = embeds.clone()
        embeds[placeholders] = speech[real].to(embeds.dtype)
        return embeds

    # -- images ----------------------------------------------------------------------------

    def encode_images(
        self,
        images: torch.Tensor | None,  # [B, I, C, H, W]
        image_mask: torch.Tensor | None = None,  # [B, I] bool (None: all real)
    ) -> torch.Tensor | None:
        """-> media [B, I, N, D]; only real images are encoded (padding stays zero and no
        text row attends to it)."""
        if images is None:
            return None
        if self.image_encoder is None:
            raise ConfigError("A sample has an image but this fusion model has no image encoder.")
        if image_mask is None:
            image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        encoded = self.image_encoder(images[image_mask], self.image_projection)  # [M, N, D]
        media = encoded.new_zeros(*images.shape[:2], *encoded.shape[1:])
        media[image_mask] = encoded
        return media

    def image_media(
        self,
        spans: tuple[torch.Tensor, torch.Tensor],  # ([B, I], [B, I]): see image_spans
        image_mask: torch.Tensor,  # [B, I] bool
        media: torch.Tensor,  # [B, I, N, D]
        start: int,  # absolute position of the first text token (cached decoding)
        length: int,  # text tokens in this call
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(media [B, I*N, D], mask [B, T, I*N]): token t sees image i when i is real and t
        lies in the image's span [first, end); of the image's N tokens, those the encoder
        marks real (`token_mask`; the release's padding tiles are not)."""
        B, n_images, N, D = media.shape  # n_images is I in the shape comments
        first, end = spans
        positions = torch.arange(start, start + length, device=media.device)[None, :, None]
        sees = (positions >= first[:, None, :]) & (positions < end[:, None, :])  # [B, T, I]
        sees = sees & image_mask[:, None, :]
        mask = sees[..., None].expand(B, length, n_images, N)  # [B, T, I, N]
        if self.image_encoder.token_mask is not None:
            mask = mask & self.image_encoder.token_mask.to(mask.device)
        return media.reshape(B, n_images * N, D), mask.reshape(B, length, n_images * N)

    def image_spans(
        self, tokens: torch.Tensor, image_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] tokens, [B, I] mask -> (first, end) [B, I]: the text positions that see
        each image, as Llama 3.2 Vision has them: from the image's <|image|> placeholder up
        to the next image's (consecutive placeholders form one group that all its text
        sees), the last group to the end. Padding slots get an empty span. Checks one
        placeholder per real image."""
        hits = tokens == self.image_token_id  # [B, T]
        counts, wanted = hits.sum(dim=1), image_mask.sum(dim=1)
        if not torch.equal(counts, wanted):
            raise ValueError(
                f"<|image|> placeholders per sample {counts.tolist()} != images "
                f"{wanted.tolist()}; put one placeholder where each image belongs."
            )
        first = torch.zeros(image_mask.shape, dtype=torch.long)
        end = torch.zeros(image_mask.shape, dtype=torch.long)
        never = torch.iinfo(torch.long).max  # the last group: to the end, past any cache
        for b, row in enumerate(hits.cpu()):
            places = row.nonzero().flatten().tolist()
            ends = [never] * len(places)
            for k in range(len(places) - 2, -1, -1):  # a group ends where the next begins
                ends[k] = ends[k + 1] if places[k + 1] == places[k] + 1 else places[k + 1]
            slots = image_mask[b].nonzero().flatten().tolist()  # the k-th real image slot
            for slot, place, stop in zip(slots, places, ends, strict=True):
                first[b, slot], end[b, slot] = place, stop
        return first.to(tokens.device), end.to(tokens.device)

    def _before_layers(self, media_and_mask: tuple | None) -> dict:
        if media_and_mask is None:
            return {}
        media, mask = media_and_mask
        return {
            int(i): partial(layer, media=media, media_mask=mask)
            for i, layer in self.cross_attention.items()
        }

    # -- forward ---------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T]
        images: torch.Tensor | None = None,  # [B, I, C, H, W]
        image_mask: torch.Tensor | None = None,  # [B, I] bool
        audio: torch.Tensor | None = None,  # [B, K, S]
        audio_lengths: torch.Tensor | None = None,  # [B, K]
    ) -> torch.Tensor:  # [B, T, D]
        media_and_mask = None
        if images is not None:
            if image_mask is None:
                image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
            media = self.encode_images(images, image_mask)
            spans = self.image_spans(tokens, image_mask)
            media_and_mask = self.image_media(spans, image_mask, media, 0, tokens.shape[1])
        return self.decoder.hidden_states(
            tokens,
            inputs_embeds=self.embed(tokens, audio, audio_lengths),
            before_layers=self._before_layers(media_and_mask),
        )

    def forward(self, tokens: torch.Tensor, **inputs) -> torch.Tensor:  # -> logits [B, T, V]
        return self.decoder.lm_head(self.hidden_states(tokens, **inputs))

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,  # [1, T0]
        max_new_tokens: int,
        stop_ids: tuple[int, ...] = (),
        images: torch.Tensor | None = None,  # [1, I, C, H, W]
        audio: torch.Tensor | None = None,  # [1, K, S]
        audio_lengths: torch.Tensor | None = None,  # [1, K]
        temperature: float = 0.0,
    ) -> list[int]:
        """Greedy (or sampled) continuation of one prompt with a KV cache; returns the new
        token ids, without the stop token."""
        decoder, T0 = self.decoder, prompt.shape[1]
        total = min(T0 + max_new_tokens, decoder.config.max_seq_len)
        if audio is not None and audio_lengths is None:
            audio_lengths = torch.full(audio.shape[:2], audio.shape[-1], device=prompt.device)
        media = spans = image_mask = None
        if images is not None:
            image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=prompt.device)
            media = self.encode_images(images, image_mask)
            spans = self.image_spans(prompt, image_mask)  # [1, I] each
        tokens, embeds, start = prompt, self.embed(prompt, audio, audio_lengths), 0
        out: list[int] = []
        decoder.setup_cache(1, total)
        try:
            for _ in range(total - T0):
                media_and_mask = None
                if media is not None:
                    media_and_mask = self.image_media(
                        spans, image_mask, media, start, tokens.shape[1]
                    )
                hidden = decoder.hidden_states(
                    tokens,
                    cache_start=start,
                    inputs_embeds=embeds,
                    before_layers=self._before_layers(media_and_mask),
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


def build_fusion_model(
    decoder: Llama,
    image_token_id: int,
    speech_token_id: int,
    image_encoder: ImageEncoder | None = None,
    speech_encoder: SpeechEncoder | None = None,
    cross_attention_every: int = 4,
    speech_adapter: dict | None = None,  # SpeechAdapterConfig fields besides the widths
    speech_augment: nn.Module | None = None,
    cross_attention: nn.ModuleDict | None = None,  # {"i": layer}: trained ones (a release's)
) -> FusionModel:
    """Compose the stage models and the new fusion parts. The given modules are used as
    they are (not copied, never modified): the cross-attention layers (unless given), an
    image projection (only when the decoder's width differs from the one the encoder
    projects to) and the speech adapter are created here, initialised so that the result
    computes what the decoder alone computes (gates at 0)."""
    cfg, dim = decoder.config, decoder.config.dim
    weight = decoder.embed_tokens.weight
    image_projection = None
    if image_encoder is not None and cross_attention is None:
        layers = cross_attention_layer_ids(cfg.n_layers, cross_attention_every)
        cross_attention = nn.ModuleDict(
            {
                str(i): GatedCrossAttention(
                    dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, dim, cfg.norm_eps
                )
                for i in layers
            }
        ).to(device=weight.device, dtype=weight.dtype)
    if image_encoder is not None and image_encoder.config.lm_dim != dim:
        # the vision stage projected to its own width; the multi-layer features carry over
        # and a new projection learns to map them into this decoder
        image_projection = nn.Linear(image_encoder.feature_dim, dim)
    adapter = None
    if speech_encoder is not None:
        adapter_cfg = SpeechAdapterConfig(
            **{**(speech_adapter or {}), "encoder_dim": speech_encoder.config.dim, "lm_dim": dim}
        )
        adapter = SpeechAdapter(adapter_cfg)
    return FusionModel(
        decoder,
        image_token_id,
        speech_token_id,
        image_encoder=image_encoder,
        image_projection=image_projection,
        cross_attention=cross_attention,
        speech_encoder=speech_encoder,
        speech_adapter=adapter,
        speech_augment=speech_augment,
    )


__all__ = ["FusionModel", "build_fusion_model"]
