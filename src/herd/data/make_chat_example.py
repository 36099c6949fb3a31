"""Regenerate the example chat manifest (src/herd/assets/chat/): a user's own multimodal
data, as the fusion stage reads it (herd.data.chat_manifest), built from the digits world.

    python -m herd.data.make_chat_example [--out DIR]

Figures are handwritten digits (scikit-learn's, 32x32 grayscale PNGs written here, from the
vision stage's own split), recordings are clips of the embedded speech corpus (referenced
by path, from their own split). Five tasks, each with its metric:

    figure          an image -> its digit word                        top1
    larger          two images -> which figure shows the larger digit  exact
    figure_chat     two turns, an image each -> each digit word        exact (last turn)
    transcribe      a clip -> its transcript (with a system message)   wer
    translate_audio a clip -> its German                               bleu

Deterministic: the same files on every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from herd.data.images import digits_images, digits_split
from herd.data.numbers import number_to_english
from herd.data.speech import DIGITS_MANIFEST

OUT = Path(__file__).resolve().parents[1] / "assets" / "chat"
PER_SPLIT = {"train": 8, "val": 2, "test": 2}  # lines per task
IMAGE_SIZE = 32


def _line(task: str, metric: str, *messages: dict) -> dict:
    return {"messages": list(messages), "task": task, "metric": metric}


def _user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _image(path: str) -> dict:
    return {"type": "image", "path": path}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def build(out: Path = OUT, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    images, labels, _ = digits_images(IMAGE_SIZE, 1)
    split_seed = 42  # data/digits.yaml's
    clips = [json.loads(line) for line in DIGITS_MANIFEST.read_text().splitlines() if line]
    speech_dir = Path("..") / DIGITS_MANIFEST.parent.name  # relative to the chat manifest
    (out / "images").mkdir(parents=True, exist_ok=True)

    def figure(split: str, unlike: int | None = None) -> tuple[str, int]:
        """A digit of the split (other than `unlike`), written as a PNG: (its path in the
        manifest, its label)."""
        i = rng.choice([k for k in digits_split(labels, split, split_seed) if labels[k] != unlike])
        name = f"images/digit_{i:04d}.png"
        Image.fromarray(images[i, 0].numpy(), mode="L").save(out / name)
        return name, labels[i]

    lines = []
    for split, n in PER_SPLIT.items():
        spoken = [c for c in clips if c["split"] == split]
        for _ in range(n):
            path, label = figure(split)
            lines.append(
                _line(
                    "figure",
                    "top1",
                    _user(_image(path), _text("which digit does this figure show?")),
                    _assistant(number_to_english(label)),
                )
            )
            a, la = figure(split)
            b, lb = figure(split, unlike=la)  # a tie would have no larger figure
            lines.append(
                _line(
                    "larger",
                    "exact",
                    _user(
                        _text("figure 1: "),
                        _image(a),
                        _text(" figure 2: "),
                        _image(b),
                        _text(" which figure shows the larger digit?"),
                    ),
                    _assistant("figure 1" if la > lb else "figure 2"),
                )
            )
            (a, la), (b, lb) = figure(split), figure(split)
            lines.append(
                _line(
                    "figure_chat",
                    "exact",
                    _user(_image(a), _text("which digit is this?")),
                    _assistant(number_to_english(la)),
                    _user(_image(b), _text("and this one?")),
                    _assistant(number_to_english(lb)),
                )
            )
            clip = rng.choice(spoken)
            audio = {"type": "audio", "path": str(speech_dir / clip["audio"])}
            lines.append(
                _line(
                    "transcribe",
                    "wer",
                    {"role": "system", "content": "you transcribe recordings word by word."},
                    _user(audio, _text("transcribe the recording.")),
                    _assistant(clip["text"]),
                )
            )
            clip = rng.choice(spoken)
            audio = {"type": "audio", "path": str(speech_dir / clip["audio"])}
            lines.append(
                _line(
                    "translate_audio",
                    "bleu",
                    _user(audio, _text("translate the recording into german.")),
                    _assistant(clip["german"]),
                )
            )
        for line in lines[-5 * n :]:
            line["split"] = split
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out, args.seed))


if __name__ == "__main__":
    main()
