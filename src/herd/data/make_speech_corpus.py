"""Regenerate the embedded spoken-digits corpus (src/herd/assets/speech/) with espeak-ng.

    apt-get install espeak-ng        # or: conda install -c conda-forge espeak-ng
    python -m herd.data.make_speech_corpus [--out DIR] [--seed 0] [--keep]

Every clip speaks one phrase of herd.data.numbers (digit strings and short number
sentences, each with a German rendering for speech translation) in one voice, at a speed and
pitch drawn per clip. A voice is an espeak-ng accent plus a variant ("en-us+f2"). The splits
are by voice: validation and test voices never occur in training, and the test split adds an
accent (Scottish English) that training never hears, so test WER measures generalisation to
new speakers rather than memorised ones.

Audio is resampled to 16 kHz mono, silence trimmed, peak-normalised to 0.4 of full scale and stored
as 8-bit FLAC: lossless for what it holds, and these samples (~40 dB SNR, telephone-like
quality and plenty for recognition) take a quarter of the space of 16-bit ones, so the whole
corpus (1490 clips) stays under 15 MB. `manifest.jsonl` has one clip per line:
    {"audio": "train/0001.flac", "text": "three one four nine", "german": "drei eins vier neun",
     "voice": "en-us+f2", "split": "train", "kind": "digits", "speed": 180, "pitch": 45,
     "seconds": 1.62}
Nothing at training time needs espeak-ng; only this script does. Output is deterministic for
a given espeak-ng version and seed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from herd.data.audio import SAMPLE_RATE
from herd.data.numbers import make_phrases

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "speech"

# (split, {voice: clips}) in plan order. Accents: en (British), en-us, en-gb-x-rp,
# en-gb-x-gbclan (Lancaster), en-029 (Caribbean), en-us-nyc, en-gb-x-gbcwmd (West Midlands),
# en-gb-scotland. Groups are only ever appended: a clip's index, phrase, speed and pitch
# follow from its place in this plan, so an appended group leaves every earlier clip as it was.
VOICE_PLAN = [
    (
        "train",
        {
            "en": 55,
            "en-us": 55,
            "en-gb-x-rp": 55,
            "en-gb-x-gbclan": 55,
            "en-029": 55,
            "en-us-nyc": 55,
            "en+f2": 55,
            "en-us+m3": 55,
            "en-gb-x-rp+f4": 55,
            "en-029+m2": 55,
            "en-us-nyc+f3": 55,
            "en-gb-x-gbclan+m6": 55,
        },
    ),
    ("val", {"en-gb-x-gbcwmd": 30, "en-us+f1": 30}),
    ("test", {"en-gb-scotland": 55, "en-gb-x-gbcwmd+f5": 55}),
    # More training speakers (issue 24: the speech stage's WER on unseen voices): the
    # training accents with variants no held-out voice uses, and espeak-ng's Klatt voices.
    (
        "train",
        {
            "en+m1": 55,
            "en-us+m4": 55,
            "en-gb-x-rp+m7": 55,
            "en-029+f4": 55,
            "en-us-nyc+m5": 55,
            "en-gb-x-gbclan+f2": 55,
            "en+klatt": 55,
            "en-us+klatt2": 55,
            "en-gb-x-rp+klatt3": 55,
            "en-029+klatt4": 55,
            "en-us-nyc+m2": 55,
            "en-gb-x-gbclan+f3": 55,
        },
    ),
]
SPLITS = ("train", "val", "test")
SPEED_WPM = (150, 220)  # espeak-ng -s; its default is 175
PITCH = (30, 70)  # espeak-ng -p, 0-99; its default is 50
TRIM_THRESHOLD = 0.02  # of the peak: quieter edges are silence
EDGE_SECONDS = 0.05  # silence kept before and after the speech
PEAK = 0.4  # of full scale: ~6.7 effective bits, a quarter smaller files, still ~40 dB SNR


def synthesise(text: str, voice: str, speed: int, pitch: int, wav: Path) -> np.ndarray:
    """espeak-ng (writing the scratch file `wav`) -> float32 [samples] at 16 kHz, edges
    trimmed, peak-normalised."""
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), text],
        check=True,
        capture_output=True,
    )
    audio, rate = sf.read(wav, dtype="float32", always_2d=True)  # [samples, channels]
    wav.unlink()
    audio = torch.from_numpy(audio.mean(axis=1))
    audio = torchaudio.functional.resample(audio, rate, SAMPLE_RATE).numpy()
    loud = np.flatnonzero(np.abs(audio) > TRIM_THRESHOLD * np.abs(audio).max())
    edge = int(EDGE_SECONDS * SAMPLE_RATE)
    audio = audio[max(0, loud[0] - edge) : loud[-1] + edge]
    return (audio * (PEAK / np.abs(audio).max())).astype(np.float32)


def plan_clips(seed: int) -> list[dict]:
    """Every clip's phrase, voice, speed and pitch; distinct phrases across the corpus, so
    held-out splits are new digit sequences as well as new voices."""
    jobs = [(split, voice, n) for split, voices in VOICE_PLAN for voice, n in voices.items()]
    phrases = make_phrases(sum(n for _, _, n in jobs), seed=seed)
    rng = random.Random(seed)
    clips, i = [], 0
    for split, voice, n in jobs:
        for _ in range(n):
            phrase = phrases[i]
            clips.append(
                {
                    "audio": f"{split}/{i:04d}.flac",
                    "text": phrase.english,
                    "german": phrase.german,
                    "voice": voice,
                    "split": split,
                    "kind": phrase.kind,
                    "speed": rng.randint(*SPEED_WPM),
                    "pitch": rng.randint(*PITCH),
                }
            )
            i += 1
    return clips


def make_corpus(out: Path, seed: int = 0, workers: int = 4, keep: bool = False) -> list[dict]:
    """Render every planned clip into `out` and write its manifest; keep=True leaves clips
    already there untouched (after an appended VOICE_PLAN group: render only the new ones)."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install espeak-ng")
    clips = plan_clips(seed)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)

    def render(clip: dict) -> None:
        if keep and (out / clip["audio"]).exists():
            clip["seconds"] = round(sf.info(out / clip["audio"]).frames / SAMPLE_RATE, 3)
            return
        scratch = workdir / Path(clip["audio"]).with_suffix(".wav").name
        audio = synthesise(clip["text"], clip["voice"], clip["speed"], clip["pitch"], scratch)
        sf.write(out / clip["audio"], audio, SAMPLE_RATE, format="FLAC", subtype="PCM_S8")
        clip["seconds"] = round(len(audio) / SAMPLE_RATE, 3)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(workers) as pool:
        workdir = Path(tmp)
        list(pool.map(render, clips))
    with (out / "manifest.jsonl").open("w", encoding="utf-8") as fh:
        for clip in clips:
            fh.write(json.dumps(clip, ensure_ascii=False) + "\n")
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="render only clips missing from --out")
    args = parser.parse_args()
    if args.out.exists() and not args.keep:
        for old in args.out.glob("*/*.flac"):  # no stale clips from an earlier, larger plan
            old.unlink()
    clips = make_corpus(args.out, args.seed, args.workers, args.keep)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    seconds = sum(c["seconds"] for c in clips)
    print(
        f"{len(clips)} clips, {seconds / 60:.1f} minutes of speech, {size / 2**20:.2f} MiB "
        f"in {args.out}"
    )


if __name__ == "__main__":
    main()
