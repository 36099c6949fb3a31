"""SpeechDataModule: the embedded spoken-digits corpus, or a user's JSONL manifest of clips.

    source: digits     src/herd/assets/speech/manifest.jsonl, split by voice (see
                       herd.data.make_speech_corpus): val and test voices are unseen in training
    source: manifest   one JSON object per line, {"audio": PATH, "text": TRANSCRIPT}, PATH
                       relative to the manifest; an optional "split" (train|val|test) on every
                       line fixes the splits, otherwise a hash of the path picks them

Transcripts are normalised (lower case a-z, apostrophe, single spaces; anything else becomes
a space); the system encodes them into its CTC units (herd.data.ctc_units). Every clip is
decoded once, at setup, and kept in memory.
A missing, empty or undecodable file, or a clip longer than `max_seconds`, raises
herd.errors.DataError naming the manifest line and the file, or with skip_bad_samples=true
is skipped and counted in a warning.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from herd.data.audio import SAMPLE_RATE, audio_duration, augment_clip, read_audio
from herd.data.base import HerdDataModule, check_source
from herd.data.ctc_units import normalise_transcript
from herd.data.manifest import read_jsonl_manifest
from herd.data.sampling import draw_key, length_bucket_train_batches
from herd.data.splits import SPLITS, hash_split
from herd.errors import ConfigError
from herd.utils.rng import sample_rng

DIGITS_MANIFEST = Path(__file__).resolve().parents[1] / "assets" / "speech" / "manifest.jsonl"
SOURCES = ("digits", "manifest")


@dataclass
class Clip:
    waveform: torch.Tensor  # [samples] float32 at 16 kHz
    text: str  # normalised transcript
    audio: str  # the file, for samples and error messages
    split: str | None = None


def read_speech_manifest(
    path: str | Path,
    max_seconds: float,
    skip_bad: bool = False,
    sample_rate: int = SAMPLE_RATE,
) -> list[Clip]:
    """Clips of a JSONL manifest. Bad lines raise DataError("MANIFEST, line N: reason.")."""

    def parse(record: dict, root: Path) -> Clip:
        return _read_clip(record, root, max_seconds, sample_rate)

    return [clip for clip, _ in read_jsonl_manifest(path, parse, skip_bad, "audio clips")]


def _read_clip(record: dict, root: Path, max_seconds: float, sample_rate: int) -> Clip:
    audio, text = record.get("audio"), record.get("text")
    if not isinstance(audio, str) or not audio:
        raise ValueError('missing a string "audio" field')
    if not isinstance(text, str):
        raise ValueError('missing a string "text" field')
    normalised = normalise_transcript(text)
    if not normalised:
        raise ValueError(f'"text" {text!r} has no letters (a-z or \')')
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(f'"split" must be one of {list(SPLITS)}, got {split!r}')
    file = root / audio
    if not file.is_file():
        raise ValueError(f"audio file {file} does not exist")
    if file.stat().st_size == 0:
        raise ValueError(f"audio file {file} is empty")
    try:
        seconds = audio_duration(file)  # header only: refuse long clips before decoding them
        if seconds > max_seconds:
            raise ValueError(
                f"audio file {file} is {seconds:.1f} s long, longer than "
                f"data.max_seconds={max_seconds:g}"
            )
        waveform = read_audio(file, sample_rate)
    except ValueError:
        raise
    except Exception as exc:  # libsndfile's errors: not audio, truncated, unknown format
        raise ValueError(f"audio file {file} cannot be decoded ({exc})") from exc
    return Clip(waveform, normalised, str(file), split)


def split_of(clip: Clip, val_fraction: float, test_fraction: float) -> str:
    """The manifest's split, or a stable hash of the file path."""
    if clip.split:
        return clip.split
    return hash_split(clip.audio, val_fraction, test_fraction)


class ClipDataset(Dataset):
    """Clips -> {"waveform", "text"}; training copies can be speed-perturbed and padded with
    silence (herd.data.audio.augment_clip), drawn from (seed, the sample's place in the
    training stream): the same after a resume and in any DataLoader worker."""

    def __init__(
        self,
        clips: list[Clip],
        speed_factors: tuple[float, ...] = (),
        seed: int = 0,
        silence_pad: float = 0.0,
    ):
        self.clips = clips
        self.speed_factors = tuple(speed_factors)
        self.seed = seed
        self.silence_pad = silence_pad

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        clip = self.clips[i]
        waveform = clip.waveform
        if self.speed_factors or self.silence_pad:
            rng = sample_rng(self.seed, draw_key(i))
            waveform = augment_clip(waveform, rng, self.speed_factors, self.silence_pad)
        return {
            "waveform": waveform,
            "text": clip.text,
        }


def collate_clips(items: list[dict]) -> dict:
    """Pad waveforms; lengths say where the real samples end."""
    return {
        "waveforms": pad_sequence([it["waveform"] for it in items], batch_first=True),  # [B, N]
        "wave_lengths": torch.tensor([len(it["waveform"]) for it in items]),  # [B]
        "texts": [it["text"] for it in items],
    }


class SpeechDataModule(HerdDataModule):
    """Spoken clips with transcripts for CTC training (see the module docstring).

    Args:
        source: "digits" (the embedded corpus) or "manifest".
        manifest: the JSONL file for source=manifest.
        batch_size: clips per batch.
        max_seconds: longer clips are bad samples (error, or skipped with skip_bad_samples).
        speed_perturb: speed factors drawn per training clip (e.g. [0.9, 1.0, 1.1]); [] for none.
        silence_pad: up to this many seconds of silence drawn before and after each training
            clip (0: none): the embedded clips are cut close to the speech, and without it
            0.3 s of silence around a test clip raised the CTC WER from 0.017 to 0.19-0.36.
        val_fraction, test_fraction: hash split for manifests without "split" fields.
    """

    def __init__(
        self,
        source: str = "digits",
        manifest: str | None = None,
        batch_size: int = 32,
        max_seconds: float = 20.0,
        speed_perturb: list[float] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        skip_bad_samples: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        sample_rate: int = SAMPLE_RATE,
        silence_pad: float = 0.0,
    ):
        super().__init__()
        if speed_perturb is not None and not isinstance(speed_perturb, list | tuple):
            speed_perturb = OmegaConf.to_container(speed_perturb)  # plain, for weights_only loads
        speed_perturb = [float(f) for f in speed_perturb or []]
        self.save_hyperparameters()
        check_source(source, SOURCES, manifest)
        if max_seconds <= 0:
            raise ConfigError(f"data.max_seconds must be positive, got {max_seconds}.")
        if any(not 0.5 <= f <= 2.0 for f in speed_perturb):
            raise ConfigError(
                f"data.speed_perturb factors must lie in [0.5, 2.0], got {speed_perturb}."
            )
        if silence_pad < 0:
            raise ConfigError(f"data.silence_pad must be >= 0 seconds, got {silence_pad}.")
        self.clips: dict[str, list[Clip]] = {}

    @property
    def manifest_path(self) -> Path:
        return DIGITS_MANIFEST if self.hparams.source == "digits" else Path(self.hparams.manifest)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        clips = read_speech_manifest(
            self.manifest_path, hp.max_seconds, hp.skip_bad_samples, hp.sample_rate
        )
        self.clips = {name: [] for name in SPLITS}
        for clip in clips:
            self.clips[split_of(clip, hp.val_fraction, hp.test_fraction)].append(clip)
        for name in ("train", "val"):
            if not self.clips[name]:
                raise ConfigError(
                    f"The {name} split of {self.manifest_path} is empty; give the manifest more "
                    'clips or set data.val_fraction / each line\'s "split".'
                )
        if not self.clips["test"]:
            self.clips["test"] = self.clips["val"]
        for name, split_clips in self.clips.items():
            train = name == "train"
            self.datasets[name] = ClipDataset(
                split_clips,
                tuple(hp.speed_perturb) if train else (),
                hp.seed,
                hp.silence_pad if train else 0.0,
            )

    def collate_fn(self):
        return collate_clips

    def train_dataloader(self) -> DataLoader:
        lengths = [len(c.waveform) for c in self.clips["train"]]
        batches = length_bucket_train_batches(self, lengths, self.hparams.batch_size)
        return self.loader("train", batch_sampler=batches)

    # -- references and samples -------------------------------------------------------------

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines for metrics.json: the WER of saying nothing (1.0), and of always
        saying the training set's most common word as often as its median transcript has
        words (a recogniser that only learnt the word prior)."""
        from torchmetrics.functional.text import word_error_rate

        self.setup("fit")
        train_texts = [c.text for c in self.clips["train"]]
        words = Counter(w for t in train_texts for w in t.split())
        lengths = sorted(len(t.split()) for t in train_texts)
        guess = " ".join([words.most_common(1)[0][0]] * lengths[len(lengths) // 2])
        test_texts = [c.text for c in self.clips["test"]]
        prior_wer = float(word_error_rate([guess] * len(test_texts), test_texts))
        return {"test/wer_empty": 1.0, "test/wer_word_prior": prior_wer}

    def sample_clips(self, n: int, split: str = "val") -> list[Clip]:
        """The first `n` clips of a split (for TensorBoard samples)."""
        self.setup("fit")
        return self.clips[split][:n]


__all__ = [
    "Clip",
    "SpeechDataModule",
    "collate_clips",
    "read_speech_manifest",
]
