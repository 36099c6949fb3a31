"""The five tasks of the embedded digits world, as chat examples (herd.data.chat.Example):

  image   handwritten digit -> its English word            (metric: top1, exact match)
  asr     spoken phrase -> English transcript               (metric: wer)
  st      spoken phrase -> German translation               (metric: bleu_st)
  mt      English number phrase -> German                   (metric: bleu_mt)
  passkey a five-digit key hidden in filler -> "The pass key is <key>."  (metric: passkey_acc)

and three video tasks on clips of digits (herd.data.video_digits), off unless weighted:

  video_sequence  the digits shown, in order           (metric: wer_video)
  video_count     how many times a digit is shown      (metric: count_acc, exact match)
  video_first     the digit shown first, or last       (metric: first_acc, exact match)

Each generator draws one split only, by the split rules of the stage that owns the data
(the vision stage's image split, the speech corpus's voices, the phrases' hash split), so no
task ever trains on another stage's held-out examples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from herd.data.audio import read_audio
from herd.data.chat import Example
from herd.data.images import digits_images, digits_split
from herd.data.numbers import TRANSLATE_PROMPT, number_to_english, phrases_of_split
from herd.data.passkey import CHAT_ANSWER, NEEDLE, REPEATED_FILLER
from herd.data.tokenizer import IMAGE, SPEECH, VIDEO
from herd.data.video_digits import QUESTIONS, digit_clips
from herd.errors import DataError

TASKS = ("image", "asr", "st", "mt", "passkey")
VIDEO_TASKS = tuple(f"video_{question}" for question in QUESTIONS)
PASSKEY_FILLER_REPEATS = 4  # the validation and test prompts' (see passkey_examples)
# What each task's answer is scored with (see herd.systems.fusion).
TASK_METRIC = {
    "image": "top1",
    "asr": "wer",
    "st": "bleu_st",
    "mt": "bleu_mt",
    "passkey": "passkey_acc",
    "video_sequence": "wer_video",
    "video_count": "count_acc",
    "video_first": "first_acc",
}
PROMPTS = {
    "image": f"{IMAGE}which digit is this?",
    "asr": f"{SPEECH}transcribe the audio.",
    "st": f"{SPEECH}translate the audio into german.",
    "mt": TRANSLATE_PROMPT,
    "passkey": "{text}what is the pass key?",
}


def translation_examples(n: int, seed: int, split: str) -> list[Example]:
    """English -> German number phrases; the split is decided by the English text."""
    return [
        Example("mt", PROMPTS["mt"].format(text=p.english), p.german)
        for p in phrases_of_split(n, seed, split)
    ]


def passkey_examples(
    n: int, seed: int, max_filler_repeats: int = PASSKEY_FILLER_REPEATS
) -> list[Example]:
    """A five-digit key with 0 to `max_filler_repeats` - 1 copies of the filler sentences on
    each side."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        before, after = rng.randrange(max_filler_repeats), rng.randrange(max_filler_repeats)
        text = REPEATED_FILLER * before + NEEDLE.format(key=key) + REPEATED_FILLER * after
        answer = CHAT_ANSWER.format(key=key)
        out.append(Example("passkey", PROMPTS["passkey"].format(text=text), answer))
    return out


def image_examples(split: str, image_size: int, channels: int, seed: int) -> list[Example]:
    """Handwritten digits -> their English word, on the vision stage's own split (same
    split_seed and fractions as data=digits), scaled to [-1, 1] as the image encoder was
    trained."""
    images, labels, _ = digits_images(image_size, channels)
    index = digits_split(labels, split, seed)
    return [
        Example(
            "image",
            PROMPTS["image"],
            number_to_english(labels[i]),
            images=(images[i] / 127.5 - 1.0,),
        )
        for i in index
    ]


def video_examples(
    n: int,
    split: str,
    seed: int,
    split_seed: int,
    image_size: int,
    channels: int,
    tasks: tuple[str, ...],
) -> dict[str, list[Example]]:
    """`n` clips of the split's digits, each asked once per video task; frames scaled to
    [-1, 1] as images are."""
    out: dict[str, list[Example]] = {t: [] for t in tasks}
    rng = random.Random(f"questions:{split}:{seed}")
    for clip in digit_clips(n, split, seed, split_seed, image_size, channels):
        frames = clip.frames / 127.5 - 1.0  # [F, C, S, S]
        for task in tasks:
            question, answer = clip.question(task.removeprefix("video_"), rng)
            out[task].append(Example(task, f"{VIDEO}{question}", answer, videos=(frames,)))
    return out


def says_a_word_twice(transcript: str) -> bool:
    """Whether a transcript says some word twice in a row ("the pin is eight eight zero"):
    the clips the fused model misreads most (experiments/fusion_recipe, twenty-second round)."""
    words = transcript.split()
    return any(a == b for a, b in zip(words, words[1:], strict=False))


def speech_examples(manifest: Path, split: str, tasks: tuple[str, ...]) -> list[Example]:
    """Spoken phrases of the corpus (split by voice) -> transcript (asr) and German (st)."""
    out = []
    for lineno, raw in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if entry.get("split") != split:
                continue
            audio = read_audio(manifest.parent / entry["audio"])
            answers = {"asr": entry["text"], "st": entry["german"]}
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            raise DataError(f"{manifest}, line {lineno}: {exc}.") from exc
        out += [
            Example(t, PROMPTS[t], answers[t], audio=(audio,), transcripts=(entry["text"],))
            for t in tasks
        ]
    return out
