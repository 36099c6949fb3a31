"""Speech encoder and adapter, following the Llama 3 paper (section 7.1).

    waveforms [B, N] @ 16 kHz, wave_lengths [B]
      -> LogMel            80-bin log-mel, 25 ms window, 10 ms hop, normalised per utterance
                           features [B, T, 80]                             (100 frames/s)
      -> SpeechEncoder     stack 4 frames + linear (40 ms frames), torchaudio Conformer
                           hidden [B, T/4, D]                              (25 frames/s)
      -> SpeechAdapter     conv1d (kernel 3, stride 2) -> one rotary Transformer layer ->
                           linear to the language model width
                           embeddings [B, T/8, lm_dim]                     (12.5 per second)

Every stage returns lengths beside its tensor and respects them: padding never changes what
a real frame becomes (the mel window never reaches past a clip's end, normalisation
statistics cover real frames only, padded frames are zeroed before every convolution, and
attention never looks at padded keys), so a clip encodes the same alone or in a batch.

Use (the fusion stage feeds `embeddings` in place of placeholder token embeddings):

    encoder = SpeechEncoder(SpeechEncoderConfig())             # or SpeechSystem(...).model
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=encoder.config.dim, lm_dim=2048))
    hidden, lengths = encoder(waveforms, wave_lengths)         # [B, T', D], [B]
    embeddings, lengths = adapter(hidden, lengths)             # [B, ceil(T'/2), lm_dim], [B]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import RMSNorm, RotaryFrequencies, apply_rope, attention

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SpeechEncoderConfig:
    """Front end and Conformer encoder. The defaults are a ~2M-parameter CPU model; the
    paper's encoder is 1B parameters (24 layers, dim 1536, 24 heads, ffn 4x)."""

    sample_rate: int = 16_000
    n_mels: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0
    log_floor: float = 1e-6  # log(max(mel power, floor)): silence stays finite
    stack: int = 4  # 10 ms frames stacked 4 -> 40 ms
    dim: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 576
    conv_kernel: int = 15  # depthwise convolution, in 40 ms frames
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_mels", "stack", "dim", "n_layers", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"speech encoder: {name} must be positive, got {getattr(self, name)}."
                )
        if self.hop_ms <= 0 or self.window_ms < self.hop_ms:
            raise ConfigError(
                f"speech encoder: need 0 < hop_ms <= window_ms, got hop_ms={self.hop_ms}, "
                f"window_ms={self.window_ms}."
            )
        if self.dim % self.n_heads:
            raise ConfigError(
                f"speech encoder: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                "pick n_heads that divides dim."
            )
        if self.conv_kernel % 2 == 0:
            raise ConfigError(
                f"speech encoder: conv_kernel must be odd ('same' padding), got {self.conv_kernel}."
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"speech encoder: dropout must be in [0, 1), got {self.dropout}.")

    @property
    def window(self) -> int:  # samples per analysis window (400 at 16 kHz)
        return round(self.sample_rate * self.window_ms / 1000)

    @property
    def hop(self) -> int:  # samples per 10 ms frame (160 at 16 kHz)
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def frame_ms(self) -> float:  # duration of one encoder output frame
        return self.hop_ms * self.stack

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SpeechAdapterConfig:
    """Conv (kernel 3, stride 2) -> one Transformer layer with rotary positions -> linear."""

    encoder_dim: int = 144
    lm_dim: int = 256  # the language model's width
    dim: int = 256  # the adapter's own Transformer width
    n_heads: int = 4
    ffn_dim: int = 1024
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    # The fusion model's reading of the adapter's output (herd.models.fusion.merge_along_ctc):
    # False, one embedding per 80 ms; True, one per word the adapter's CTC path says, each
    # the mean of its frames, first in the clip's placeholders (the rest hold the blank).
    merge_by_ctc: bool = False

    def __post_init__(self) -> None:
        for name in ("encoder_dim", "lm_dim", "dim", "n_heads", "ffn_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"speech adapter: {name} must be positive, got {getattr(self, name)}."
                )
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"speech adapter: dim {self.dim} / n_heads {self.n_heads} must give an even head "
                "dim for RoPE; pick n_heads accordingly."
            )

    def to_dict(self) -> dict:
        return asdict(self)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths [B] -> [B, max_len] bool, True on real frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


# ----------------------------------------------------------------------------- front end


class LogMel(nn.Module):
    """waveforms [B, N], lengths [B] -> log-mel [B, T, n_mels], frame lengths [B].

    Windows are not centred (no reflection padding), so frame t covers samples
    [t*hop, t*hop + window) and a real frame never reads padding. Each utterance is
    normalised to zero mean and unit variance per mel bin over its real frames; padded
    frames are 0."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.window, self.hop = cfg.window, cfg.hop
        self.log_floor = cfg.log_floor
        # the filterbank is computed on the CPU even under a meta-device context (which
        # builds models without memory): torchaudio reads scalars out of tensors while making it
        with torch.device("cpu"):
            self.mel = torchaudio.transforms.MelSpectrogram(
                sample_rate=cfg.sample_rate,
                n_fft=cfg.window,
                win_length=cfg.window,
                hop_length=cfg.hop,
                n_mels=cfg.n_mels,
                center=False,
                power=2.0,
            )

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return ((lengths - self.window).clamp(min=0) // self.hop + 1).long()

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        if waveforms.shape[1] < self.window:  # at least one whole window
            waveforms = F.pad(waveforms, (0, self.window - waveforms.shape[1]))
        # the STFT runs in fp32 whatever the autocast dtype: bf16 power spectra lose the quiet bins
        with torch.autocast(waveforms.device.type, enabled=False):
            power = self.mel(waveforms.float())  # [B, n_mels, T]
        features = power.clamp(min=self.log_floor).log().transpose(1, 2)  # [B, T, n_mels]
        frame_lengths = self.frame_lengths(lengths)  # [B]
        real = padding_mask(frame_lengths, features.shape[1])[..., None]  # [B, T, 1]
        count = frame_lengths[:, None, None].clamp(min=1)  # [B, 1, 1]
        mean = (features * real).sum(1, keepdim=True) / count  # [B, 1, n_mels]
        var = (((features - mean) * real) ** 2).sum(1, keepdim=True) / count
        features = (features - mean) / (var + 1e-5).sqrt()
        return features * real, frame_lengths


# ----------------------------------------------------------------------------- encoder


class SpeechEncoder(nn.Module):
    """Log-mel -> stride-4 stacking + linear (40 ms frames) -> Conformer.

    forward(waveforms [B, N], wave_lengths [B]) -> (hidden [B, T', dim], lengths [B]).
    `features` and `encode` split the two halves so SpecAugment can act on the log-mels in
    between during training."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        self.config = cfg
        self.front_end = LogMel(cfg)
        self.stack_proj = nn.Linear(cfg.stack * cfg.n_mels, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        # BatchNorm, not GroupNorm, in the convolution modules: GroupNorm would pool
        # statistics over padded frames too, so padding would change real frames.
        self.conformer = torchaudio.models.Conformer(
            input_dim=cfg.dim,
            num_heads=cfg.n_heads,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.n_layers,
            depthwise_conv_kernel_size=cfg.conv_kernel,
            dropout=cfg.dropout,
        )

    def features(self, waveforms: torch.Tensor, wave_lengths: torch.Tensor):
        """-> normalised log-mel [B, T, n_mels], frame lengths [B] (10 ms frames)."""
        return self.front_end(waveforms, wave_lengths)

    def encode(self, features: torch.Tensor, frame_lengths: torch.Tensor):
        """log-mel [B, T, n_mels] -> hidden [B, T // stack, dim], lengths [B] (40 ms frames)."""
        B, T, n_mels = features.shape
        stack = self.config.stack
        if T < stack:  # a clip shorter than one stacked frame still gives one frame
            features = F.pad(features, (0, 0, 0, stack - T))
            T = stack
        T = T // stack * stack  # a trailing partial stack is dropped
        x = features[:, :T].reshape(B, T // stack, stack * n_mels)  # [B, T', stack*n_mels]
        lengths = (frame_lengths // stack).clamp(min=1)  # [B] (as output_lengths)
        real = padding_mask(lengths, x.shape[1])  # [B, T']
        x = self.dropout(self.stack_proj(x)) * real[..., None]  # [B, T', dim]
        for layer in self.conformer.conformer_layers:
            x = conformer_layer(layer, x, real)  # [B, T', dim]
        return x * real[..., None], lengths

    def forward(self, waveforms: torch.Tensor, wave_lengths: torch.Tensor):
        return self.encode(*self.features(waveforms, wave_lengths))

    def output_lengths(self, wave_lengths: torch.Tensor) -> torch.Tensor:
        """Encoder frames (40 ms) for clips of `wave_lengths` samples [B], without running it."""
        return (self.front_end.frame_lengths(wave_lengths) // self.config.stack).clamp(min=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def conformer_layer(layer, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """torchaudio's ConformerLayer.forward (same modules, same order: half FFN, attention,
    convolution, half FFN, norm), with padded frames zeroed before the depthwise
    convolution. torchaudio's own forward lets padding leak into the last real frames
    through that convolution's receptive field.

    x [B, T, D], real [B, T] bool -> [B, T, D]."""
    x = x + 0.5 * layer.ffn1(x)
    residual = x
    h = layer.self_attn_layer_norm(x).transpose(0, 1)  # [T, B, D]: MultiheadAttention's layout
    h, _ = layer.self_attn(h, h, h, key_padding_mask=~real, need_weights=False)
    x = residual + layer.self_attn_dropout(h.transpose(0, 1))
    # convolution module: norm -> pointwise conv + GLU -> depthwise conv -> norm -> SiLU -> pointwise
    conv = layer.conv_module
    pointwise, glu, depthwise, norm, act, pointwise_out, dropout = conv.sequential
    h = conv.layer_norm(x).transpose(1, 2)  # [B, D, T]
    h = glu(pointwise(h)) * real[:, None, :]  # [B, D, T], zeros where padded
    h = pointwise_out(act(norm(depthwise(h))))  # [B, D, T]
    x = x + dropout(h).transpose(1, 2)
    x = x + 0.5 * layer.ffn2(x)
    return layer.final_layer_norm(x)


# ----------------------------------------------------------------------------- adapter


class RotaryEncoderLayer(nn.Module):
    """Pre-norm bidirectional Transformer layer with RoPE (Llama's helpers) and a padding mask.

    x [B, T, dim], real [B, T] -> [B, T, dim]."""

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.rope = RotaryFrequencies(self.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(D, dim=-1)  # each [B, T, D]
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        positions = torch.arange(T, device=x.device).expand(B, T)  # [B, T]
        cos, sin = self.rope(positions)  # [B, T, Hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H, T, Hd]
        mask = real[:, None, None, :]  # [B, 1, 1, T]: no query attends to a padded key
        h = attention(q, k, v, mask)  # [B, H, T, Hd]
        x = x + self.out(h.transpose(1, 2).reshape(B, T, D))
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class SpeechAdapter(nn.Module):
    """Encoder frames (40 ms) -> language-model embeddings (80 ms).

    forward(hidden [B, T', encoder_dim], lengths [B]) -> (embeddings [B, ceil(T'/2), lm_dim],
    lengths [B]); padded positions of `embeddings` are 0."""

    def __init__(self, cfg: SpeechAdapterConfig):
        super().__init__()
        self.config = cfg
        self.conv = nn.Conv1d(cfg.encoder_dim, cfg.dim, kernel_size=3, stride=2, padding=1)
        self.layer = RotaryEncoderLayer(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(cfg.dim, cfg.lm_dim, bias=False)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + 1) // 2  # ceil(T / 2): kernel 3, stride 2, padding 1

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor):
        real_in = padding_mask(lengths, hidden.shape[1])  # [B, T']
        # zeroed padding = the conv's own zero padding, so a clip's last frame is the same
        # alone or batched
        h = (hidden * real_in[..., None]).transpose(1, 2)  # [B, encoder_dim, T']
        h = self.conv(h).transpose(1, 2)  # [B, ceil(T'/2), dim]
        out_lengths = self.output_lengths(lengths)  # [B]
        real = padding_mask(out_lengths, h.shape[1])  # [B, T'']
        h = self.layer(h, real)  # [B, T'', dim]
        return self.proj(self.norm(h)) * real[..., None], out_lengths  # [B, T'', lm_dim]


def frames_for_seconds(seconds: float, cfg: SpeechEncoderConfig) -> int:
    """Encoder frames (before the adapter) for a clip of `seconds` (used to size buffers)."""
    samples = round(seconds * cfg.sample_rate)
    mel_frames = max(0, samples - cfg.window) // cfg.hop + 1
    return max(1, mel_frames // cfg.stack)


__all__ = [
    "LogMel",
    "SpeechAdapter",
    "SpeechAdapterConfig",
    "SpeechEncoder",
    "SpeechEncoderConfig",
    "frames_for_seconds",
    "padding_mask",
]
