"""The five tasks of the embedded digits world, as chat examples (herd.data.chat.Example):

  image   handwritten digit -> its English word            (metric: top1, exact match)
  asr     spoken phrase -> English transcript               (metric: wer)
  st      spoken phrase -> German translation               (metric: bleu_st)
  mt      English number phrase -> German                   (metric: bleu_mt)
  passkey a five-digit key hidden in filler -> "The pass key is <key>."  (metric: passkey_acc)

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
from herd.data.tokenizer import IMAGE, SPEECH
from herd.errors import DataError

TASKS = ("image", "asr", "st", "mt", "passkey")
PASSKEY_FILLER_REPEATS = 4  # the validation and test prompts' (see passkey_examples)
# What each task's answer is scored with (see herd.systems.fusion).
TASK_METRIC = {
    "image": "top1",
    "asr": "wer",
    "st": "bleu_st",
    "mt": "bleu_mt",
    "passkey": "passkey_acc",
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
        out += [Example(t, PROMPTS[t], answers[t], audio=(audio,)) for t in tasks]
    return out
