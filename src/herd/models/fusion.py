"""The composed multimodal model: the Llama decoder, seeing images through gated
cross-attention and hearing speech through embeddings spliced into its input.

    tokens [B, T] with one <|image|> per image and one run of <|speech|> per clip
    images [B, I, C, H, W] (image_mask [B, I]) -> ImageEncoder -> media [B, I, N, D]
        -> cross-attention layers before every k-th decoder layer; a text token sees the
           most recent image (group) before it, as in Llama 3.2 Vision (see image_spans)
    videos [B, V, F, C, H, W] (frame_mask [B, V, F]) -> ImageEncoder per frame
        -> TemporalAggregator -> video media [B, V, S*L, D] -> video cross-attention layers,
           each ahead of an image one (herd.models.video); text sees the most recent
           <|video|> before it, as it does images
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

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import Llama, sample_next_token
from herd.models.speech import SpeechAdapter, SpeechAdapterConfig, SpeechEncoder
from herd.models.video import (
    TemporalAggregator,
    TemporalAggregatorConfig,
    video_cross_attention_layer_ids,
)
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
        video_token_id: int | None = None,
        video_aggregator: TemporalAggregator | None = None,
        video_cross_attention: nn.ModuleDict | None = None,  # {"i": GatedCrossAttention}
    ):
        super().__init__()
        if (video_aggregator is None) != (video_cross_attention is None):
            raise ConfigError(
                "A video aggregator needs video cross-attention layers, and vice versa."
            )
        if video_aggregator is not None and (image_encoder is None or video_token_id is None):
            raise ConfigError(
                "Video needs the image encoder (it encodes the frames) and a video token."
            )
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
        self.video_token_id = video_token_id
        self.video_aggregator = video_aggregator
        self.video_cross_attention = video_cross_attention

    @torch.no_grad()
    def video_cross_attention_from_image(self) -> None:
        """Each video cross-attention layer becomes a copy of the image cross-attention layer
        it runs before (both read the image encoder's projected tokens), with its gates
        closed again, so the model still computes what it did without video."""
        for layer, video_layer in self.video_cross_attention.items():
            video_layer.load_state_dict(self.cross_attention[layer].state_dict())
            video_layer.attn_gate.gate.zero_()
            video_layer.mlp_gate.gate.zero_()

    def placeholder_ids(self) -> list[int]:
        """The media placeholder tokens (image, speech, video) in the decoder's vocabulary."""
        ids = (self.image_token_id, self.speech_token_id, self.video_token_id)
        return [i for i in ids if i is not None and i < self.decoder.config.vocab_size]

    @property
    def cross_attention_layers(self) -> list[int]:
        return sorted(int(i) for i in self.cross_attention or {})

    def fusion_modules(self) -> list[nn.Module]:
        """What composing added to the stage models (what the `adapter` strategy trains
        besides the encoders)."""
        parts = [
            self.cross_attention,
            self.image_projection,
            self.speech_adapter,
            self.video_aggregator,
            self.video_cross_attention,
        ]
        return [m for m in parts if m is not None]

    # -- speech ----------------------------------------------------------------------------

    def speech_tokens(self, num_samples: int) -> int:
        """Placeholders a clip of `num_samples` samples needs: one per adapter output."""
        if self.speech_encoder is None:
            raise ConfigError("This fusion model has no speech encoder; drop the speech tasks.")
        frames = self.speech_encoder.front_end.frame_lengths(torch.tensor([num_samples]))
        encoded = (frames // self.speech_encoder.config.stack).clamp(min=1)
        return int(SpeechAdapter.output_lengths(encoded)[0])

    def encode_speech(
        self,
        audio: torch.Tensor,  # [B, K, S]
        audio_lengths: torch.Tensor,  # [B, K], 0 where a sample has no clip k
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (speech [M, L, D], lengths [M]): the adapter's embeddings (one per 80 ms) of
        the M real clips, in (sample, clip) order."""
        if self.speech_encoder is None:
            raise ConfigError("A sample has speech but this fusion model has no speech encoder.")
        real_clip = audio_lengths > 0  # [B, K]
        clips, clip_lengths = audio[real_clip], audio_lengths[real_clip]  # [M, S], [M]
        clips = clips[:, : int(clip_lengths.max())]
        features, frame_lengths = self.speech_encoder.features(clips, clip_lengths)
        hidden, lengths = self.speech_encoder.encode(self.speech_augment(features), frame_lengths)
        return self.speech_adapter(hidden, lengths)  # [M, L, D], [M]

    def embed(
        self,
        tokens: torch.Tensor,  # [B, T]
        audio: torch.Tensor | None = None,  # [B, K, S]
        audio_lengths: torch.Tensor | None = None,  # [B, K], 0 where a sample has no clip k
        speech: tuple[torch.Tensor, torch.Tensor] | None = None,  # encode_speech's, if done
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with the speech placeholders replaced by speech."""
        embeds = self.decoder.embed_tokens(tokens)  # [B, T, D]
        placeholders = tokens == self.speech_token_id  # [B, T]
        if audio is None or not placeholders.any():
            return embeds
        speech, lengths = speech or self.encode_speech(audio, audio_lengths)  # [M, L, D], [M]
        if self.speech_adapter.config.merge_by_ctc:
            table = self.decoder.embed_tokens.weight  # [V, D]
            speech = merge_along_ctc(speech, lengths, table, self.speech_token_id)
        # clips are in (sample, clip) order, as are the placeholder runs: row-major on both
        real_clip = audio_lengths > 0  # [B, K]
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(media [B, I*N, D], mask [B, T, I*N], samples [B]): token t sees image i when i is
        real and t lies in the image's span [first, end); of the image's N tokens, those the
        encoder marks real (`token_mask`; the release's padding tiles are not); `samples`
        marks the samples with a real image."""
        return media_rows(spans, image_mask, media, self.image_encoder.token_mask, start, length)

    def image_spans(
        self, tokens: torch.Tensor, image_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] tokens, [B, I] mask -> (first, end) [B, I]: see `placeholder_spans`."""
        return placeholder_spans(tokens, image_mask, self.image_token_id, "image")

    # -- videos ----------------------------------------------------------------------------

    def encode_videos(
        self,
        videos: torch.Tensor,  # [B, V, F, C, H, W]
        frame_mask: torch.Tensor | None = None,  # [B, V, F] bool (None: all real)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> video media [B, V, S*L, D] (S groups of L tokens) and their token mask
        [B, V, S*L]; only real frames are encoded, and a group of padding frames (or a
        padding video) is never attended to."""
        if self.video_aggregator is None:
            raise ConfigError("A sample has a video but this fusion model has no video adapter.")
        B, V, n_frames = videos.shape[:3]
        if frame_mask is None:
            frame_mask = torch.ones(B, V, n_frames, dtype=torch.bool, device=videos.device)
        encoded = self.image_encoder(videos[frame_mask], self.image_projection)  # [M, N, D]
        frames = encoded.new_zeros(B, V, n_frames, *encoded.shape[1:])  # [B, V, F, N, D]
        frames[frame_mask] = encoded
        tokens, groups = self.video_aggregator(frames.flatten(0, 1), frame_mask.flatten(0, 1))
        S, L, D = tokens.shape[1:]  # tokens [B*V, S, L, D], groups [B*V, S]
        mask = groups[..., None].expand(-1, -1, L).reshape(B, V, S * L)
        return tokens.reshape(B, V, S * L, D), mask

    def video_inputs(
        self, tokens: torch.Tensor, videos: torch.Tensor, frame_mask: torch.Tensor | None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spans, video_mask [B, V], media, token_mask): what media_rows needs per call."""
        media, token_mask = self.encode_videos(videos, frame_mask)
        video_mask = token_mask.any(dim=-1)  # [B, V]: a video with a real frame
        spans = placeholder_spans(tokens, video_mask, self.video_token_id, "video")
        return spans, video_mask, media, token_mask

    # -- layers ----------------------------------------------------------------------------

    def _before_layers(
        self, image: tuple | None, video: tuple | None = None
    ) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """{decoder layer: f} running, before that layer, its video cross-attention layer
        (if any) and then its image one, on (media, mask, samples) from media_rows.

        A cross-attention layer is the identity on a sample without the medium (its rows
        see nothing, and its media are zeros, which even `blind_rows_attend_all` reads as a
        zero update), so it runs on the samples that have one only. In the digits mixture
        one sample in ten has an image, and running the layers on every row cost ~40% of
        the decoder's time (experiments/fusion_recipe)."""
        runs: dict[int, list] = {}
        for inputs, layers in (
            (video, self.video_cross_attention),
            (image, self.cross_attention),
        ):
            if inputs is None:
                continue
            media, mask, samples = inputs
            if not bool(samples.any()):
                continue
            rows = None if bool(samples.all()) else samples.nonzero().squeeze(1)  # [B']
            if rows is not None:
                media, mask = media[rows], mask[rows]
            for i, layer in layers.items():
                f = partial(layer, media=media, media_mask=mask)
                runs.setdefault(int(i), []).append(
                    f if rows is None else partial(_on_rows, f, rows)
                )
        return {i: partial(_in_turn, fs) for i, fs in runs.items()}

    # -- forward ---------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T]
        images: torch.Tensor | None = None,  # [B, I, C, H, W]
        image_mask: torch.Tensor | None = None,  # [B, I] bool
        audio: torch.Tensor | None = None,  # [B, K, S]
        audio_lengths: torch.Tensor | None = None,  # [B, K]
        videos: torch.Tensor | None = None,  # [B, V, F, C, H, W]
        frame_mask: torch.Tensor | None = None,  # [B, V, F] bool
        speech: tuple[torch.Tensor, torch.Tensor] | None = None,  # encode_speech's, if done
    ) -> torch.Tensor:  # [B, T, D]
        image = video = None
        T = tokens.shape[1]
        if images is not None:
            if image_mask is None:
                image_mask = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
            media = self.encode_images(images, image_mask)
            spans = self.image_spans(tokens, image_mask)
            image = self.image_media(spans, image_mask, media, 0, T)
        if videos is not None:
            spans, video_mask, media, token_mask = self.video_inputs(tokens, videos, frame_mask)
            video = media_rows(spans, video_mask, media, token_mask, 0, T)
        return self.decoder.hidden_states(
            tokens,
            inputs_embeds=self.embed(tokens, audio, audio_lengths, speech),
            before_layers=self._before_layers(image, video),
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
        videos: torch.Tensor | None = None,  # [1, V, F, C, H, W]
        frame_mask: torch.Tensor | None = None,  # [1, V, F]
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
        video = None if videos is None else self.video_inputs(prompt, videos, frame_mask)
        tokens, embeds, start = prompt, self.embed(prompt, audio, audio_lengths), 0
        out: list[int] = []
        decoder.setup_cache(1, total)
        try:
            for _ in range(total - T0):
                T = tokens.shape[1]
                image = (
                    None if media is None else self.image_media(spans, image_mask, media, start, T)
                )
                video_rows = None if video is None else media_rows(*video, start, T)
                hidden = decoder.hidden_states(
                    tokens,
                    cache_start=start,
                    inputs_embeds=embeds,
                    before_layers=self._before_layers(image, video_rows),
                )  # [1, T, D]
                logits = decoder.lm_head(hidden[:, -1])  # [1, V]
                logits[:, self.placeholder_ids()] = float("-inf")  # it could attach no media
                nxt = int(sample_next_token(logits, temperature)[0])
                start += tokens.shape[1]
                if nxt in stop_ids:
                    break
                out.append(nxt)
                tokens, embeds = torch.tensor([[nxt]], device=prompt.device), None
        finally:
            decoder.clear_cache()
        return out


def merge_along_ctc(
    speech: torch.Tensor,  # [M, L, D] the adapter's embeddings, one per 80 ms
    lengths: torch.Tensor,  # [M] real embeddings of each clip
    table: torch.Tensor,  # [V, D] the decoder's input embeddings
    blank: int,  # the <|speech|> placeholder's row: "no new word here"
) -> torch.Tensor:  # [M, L, D]
    """One embedding per word the clip says: the frames' greedy CTC path (each frame's
    nearest row of `table` by cosine, as FusionSystem's auxiliary CTC loss classifies them)
    cut into runs of one token, each run's frames averaged. A word said twice in a row is
    two runs, since CTC needs a blank between them. Clip m's K runs fill its first K
    positions and table[blank] its other real ones; padding stays 0. Meant to spare the
    decoder counting frames, it read worse on the digits (fusion_recipe, twenty-third round)."""
    m, length, _ = speech.shape
    with torch.no_grad():
        unit = F.normalize(speech.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
        path = unit.argmax(dim=-1)  # [M, L]
        real = torch.arange(length, device=speech.device)[None] < lengths[:, None]  # [M, L]
        path = path.masked_fill(~real, blank)
        before = F.pad(path, (1, 0), value=blank)[:, :-1]  # [M, L]: the previous frame's
        in_word = path != blank  # [M, L]
        starts = in_word & (path != before)  # [M, L]: a frame that begins a run
        word = starts.cumsum(dim=1) - 1  # [M, L]: its run's index within the clip
        words = starts.sum(dim=1)  # [M]
    rows = (torch.arange(m, device=speech.device)[:, None] * length + word)[in_word]  # [N]
    sums = speech.new_zeros(m * length, speech.shape[-1]).index_add(0, rows, speech[in_word])
    counts = torch.bincount(rows, minlength=m * length)  # [M * L]: frames in each run
    merged = (sums / counts.clamp(min=1)[:, None].to(sums.dtype)).view_as(speech)  # [M, L, D]
    slot = torch.arange(length, device=speech.device)[None]  # [1, L]
    filler = (slot >= words[:, None]) & real  # [M, L]
    return torch.where(filler[..., None], table[blank].to(speech.dtype), merged)


def placeholder_spans(
    tokens: torch.Tensor, present: torch.Tensor, token_id: int, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] tokens, [B, I] real-media mask -> (first, end) [B, I]: the text positions that
    see each image (kind "image") or video, as Llama 3.2 Vision has it for images: from the
    medium's <|kind|> placeholder up to the next one's (consecutive placeholders form one
    group that all its text sees), the last group to the end. Padding slots get an empty
    span. Checks one placeholder per real medium."""
    hits = tokens == token_id  # [B, T]
    counts, wanted = hits.sum(dim=1), present.sum(dim=1)
    if not torch.equal(counts, wanted):
        raise ValueError(
            f"<|{kind}|> placeholders per sample {counts.tolist()} != {kind}s "
            f"{wanted.tolist()}; put one placeholder where each {kind} belongs."
        )
    first = torch.zeros(present.shape, dtype=torch.long)
    end = torch.zeros(present.shape, dtype=torch.long)
    never = torch.iinfo(torch.long).max  # the last group: to the end, past any cache
    for b, row in enumerate(hits.cpu()):
        places = row.nonzero().flatten().tolist()
        ends = [never] * len(places)
        for k in range(len(places) - 2, -1, -1):  # a group ends where the next begins
            ends[k] = ends[k + 1] if places[k + 1] == places[k] + 1 else places[k + 1]
        slots = present[b].nonzero().flatten().tolist()  # the k-th real slot
        for slot, place, stop in zip(slots, places, ends, strict=True):
            first[b, slot], end[b, slot] = place, stop
    return first.to(tokens.device), end.to(tokens.device)


def media_rows(
    spans: tuple[torch.Tensor, torch.Tensor],  # ([B, I], [B, I]): see placeholder_spans
    present: torch.Tensor,  # [B, I] bool
    media: torch.Tensor,  # [B, I, N, D]
    token_mask: torch.Tensor | None,  # [N] or [B, I, N] bool: which of a medium's tokens are real
    start: int,  # absolute position of the first text token (cached decoding)
    length: int,  # text tokens in this call
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(media [B, I*N, D], mask [B, T, I*N], samples [B]): token t sees medium i when i is
    real and t lies in its span [first, end), and of its N tokens the real ones; `samples`
    marks the samples with a real medium."""
    B, n_media, N, D = media.shape  # n_media is I in the shape comments
    first, end = spans
    positions = torch.arange(start, start + length, device=media.device)[None, :, None]
    sees = (positions >= first[:, None, :]) & (positions < end[:, None, :])  # [B, T, I]
    sees = sees & present[:, None, :]
    mask = sees[..., None].expand(B, length, n_media, N)  # [B, T, I, N]
    if token_mask is not None:
        token_mask = token_mask.to(mask.device).expand(B, n_media, N)  # [B, I, N]
        mask = mask & token_mask[:, None]
    return media.reshape(B, n_media * N, D), mask.reshape(B, length, n_media * N), present.any(1)


def _on_rows(f: Callable, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f applied to the rows `rows` [B'] of x [B, T, D]; the other rows pass unchanged."""
    return x.index_copy(0, rows, f(x[rows]))


def _in_turn(functions: list, x: torch.Tensor) -> torch.Tensor:
    for f in functions:
        x = f(x)
    return x


def _cross_attention_layers(decoder: Llama, layers: list[int]) -> nn.ModuleDict:
    """{"i": GatedCrossAttention} shaped like the decoder, on its device and dtype."""
    cfg, weight = decoder.config, decoder.embed_tokens.weight
    return nn.ModuleDict(
        {
            str(i): GatedCrossAttention(
                cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.dim, cfg.norm_eps
            )
            for i in layers
        }
    ).to(device=weight.device, dtype=weight.dtype)


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
    video_token_id: int | None = None,
    video: dict | None = None,  # TemporalAggregatorConfig fields besides dim, and `every`
) -> FusionModel:
    """Compose the stage models and the new fusion parts. The given modules are used as
    they are (not copied, never modified): the cross-attention layers (unless given), an
    image projection (only when the decoder's width differs from the one the encoder
    projects to), the speech adapter and, with `video`, the temporal aggregator and video
    cross-attention layers (one ahead of every `video["every"]`-th image one) are created
    here, initialised so that the result computes what the decoder alone computes (gates
    at 0)."""
    cfg, dim = decoder.config, decoder.config.dim
    weight = decoder.embed_tokens.weight
    image_projection = None
    if image_encoder is not None and cross_attention is None:
        layers = cross_attention_layer_ids(cfg.n_layers, cross_attention_every)
        cross_attention = _cross_attention_layers(decoder, layers)
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
    aggregator = video_cross_attention = None
    if video is not None:
        if image_encoder is None:
            raise ConfigError(
                "Video needs the image encoder (it encodes the frames); set model.vision."
            )
        video = dict(video)
        every = video.pop("every", 4)
        aggregator = TemporalAggregator(TemporalAggregatorConfig(dim=dim, **video))
        layers = video_cross_attention_layer_ids([int(i) for i in cross_attention], every)
        video_cross_attention = _cross_attention_layers(decoder, layers)
        aggregator.to(device=weight.device, dtype=weight.dtype)
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
        video_token_id=video_token_id,
        video_aggregator=aggregator,
        video_cross_attention=video_cross_attention,
    )


__all__ = ["FusionModel", "build_fusion_model", "media_rows", "placeholder_spans"]
