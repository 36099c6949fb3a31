"""Audio I/O and waveform/spectrogram augmentation for the speech stage.

Reading goes through `soundfile` (libsndfile: WAV, FLAC, OGG, MP3, ...): torchaudio 2.9+
moved `torchaudio.load` to torchcodec, which herd does not depend on. Every clip comes out
as mono float32 at the model's sample rate.
"""

from __future__ import annotations

from pathlib import Path

import soundfile as sf
import torch
import torchaudio
from torch import nn

from herd.errors import ConfigError
from herd.models.speech import SpeechEncoderConfig

# the rate the speech encoder reads (its config is the one home of this number)
SAMPLE_RATE = SpeechEncoderConfig.sample_rate


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A file -> float32 [samples] in [-1, 1] at `sample_rate`, channels averaged to mono.

    Raises FileNotFoundError for a missing file, ValueError for one with no samples, and
    soundfile's error (a RuntimeError) for one that cannot be decoded; callers that know
    the manifest line turn these into herd.errors.DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [samples, channels]
    if audio.shape[0] == 0:
        raise ValueError(f"{path} holds no audio samples")
    waveform = torch.from_numpy(audio).mean(dim=1)  # [samples]: stereo is downmixed
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform.contiguous()


def audio_duration(path: str | Path) -> float:
    """Seconds of audio, from the header alone (no decoding)."""
    info = sf.info(str(path))
    return info.frames / info.samplerate


def pad_silence(
    waveform: torch.Tensor, before: float, after: float, sample_rate: int = SAMPLE_RATE
) -> torch.Tensor:
    """`waveform` [samples] with `before` and `after` seconds of silence (zeros) around it."""
    pad = (round(before * sample_rate), round(after * sample_rate))
    return torch.nn.functional.pad(waveform, pad)


def speed_perturb(waveform: torch.Tensor, factor: float, sample_rate: int = SAMPLE_RATE):
    """Play `waveform` [samples] `factor` times faster (tempo and pitch together, as in Kaldi's
    speed perturbation): resample to sample_rate / factor and read it at sample_rate."""
    if factor == 1.0:
        return waveform
    # rates on a 100 Hz grid keep the resampling kernel small (gcd >= 100)
    target = int(round(sample_rate / factor / 100) * 100)
    return torchaudio.functional.resample(waveform, sample_rate, target)


def augment_clip(
    waveform: torch.Tensor, rng, speed_factors: tuple[float, ...] = (), silence_pad: float = 0.0
) -> torch.Tensor:
    """A training copy of `waveform` [samples]: played at a speed factor drawn from
    `speed_factors` (none: as is), then with up to `silence_pad` seconds of silence drawn
    before and after it; `rng` (random.Random) decides both."""
    if speed_factors:
        waveform = speed_perturb(waveform, rng.choice(speed_factors))
    if silence_pad:
        waveform = pad_silence(waveform, rng.uniform(0, silence_pad), rng.uniform(0, silence_pad))
    return waveform


class SpecAugment(nn.Module):
    """SpecAugment's frequency and time masking (Park et al., 2019) on log-mel features.

    Active only in training mode. Features are normalised per utterance, so masked cells are
    set to 0, the utterance mean. Time masks cover at most `max_time_fraction` of each clip
    so a short clip never loses most of its words.

    Args:
        freq_masks: masks per clip over mel bins, each up to `freq_width` bins wide.
        time_masks: masks per clip over frames (10 ms), each up to `time_width` frames wide.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 15,
        time_masks: int = 2,
        time_width: int = 10,
        max_time_fraction: float = 0.1,
    ):
        super().__init__()
        for name, value in (
            ("freq_masks", freq_masks),
            ("freq_width", freq_width),
            ("time_masks", time_masks),
            ("time_width", time_width),
        ):
            if value < 0:
                raise ConfigError(f"spec_augment.{name} must be >= 0, got {value}.")
        if not 0 < max_time_fraction <= 1:
            raise ConfigError(
                f"spec_augment.max_time_fraction must be in (0, 1], got {max_time_fraction}."
            )
        self.freq_masks, self.time_masks = freq_masks, time_masks
        self.freq_masking = torchaudio.transforms.FrequencyMasking(freq_width, iid_masks=True)
        self.time_masking = torchaudio.transforms.TimeMasking(
            time_width, iid_masks=True, p=max_time_fraction
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, n_mels] -> [B, T, n_mels] with masked cells set to 0."""
        if not self.training:
            return features
        spec = features.transpose(1, 2).unsqueeze(1)  # [B, 1, n_mels, T]: torchaudio's layout
        for _ in range(self.freq_masks):
            spec = self.freq_masking(spec, mask_value=0.0)
        for _ in range(self.time_masks):
            spec = self.time_masking(spec, mask_value=0.0)
        return spec.squeeze(1).transpose(1, 2)


__all__ = ["SAMPLE_RATE", "SpecAugment", "audio_duration", "read_audio", "speed_perturb"]
