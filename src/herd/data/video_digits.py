"""Short clips of handwritten digits, for the video adapter: questions whose answer needs time.

A clip is a run of frames [F, C, S, S] (uint8, ink bright on black, like data=digits). Its
story is 2-5 *shows*: one handwritten digit on screen for 2-6 consecutive frames, appearing
at a random place and drifting a pixel per frame; between shows 1-3 gap frames, blank or a
distractor (scattered specks with no digit). Blank frames pad a clip up to
`min_frames`. Three questions per clip:

    sequence  "which digits are shown, in order?"     -> "three seven three"  (WER)
    count     "how many times is a seven shown?"      -> "two"                (exact)
    first     "which digit is shown first?" / "last"  -> "three"              (top-1)

A show's digit image comes from one split of the vision stage's digits (same split_seed and
fractions as data=digits), so test clips show only handwriting the encoder never trained on;
clips are drawn deterministically from (split, seed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from herd.data.images import digits_images, digits_split
from herd.data.numbers import number_to_english

QUESTIONS = ("sequence", "count", "first")
SHOWS = (2, 5)  # shows per clip, inclusive
SHOW_FRAMES = (2, 6)  # frames per show
GAP_FRAMES = (1, 3)  # frames between shows
MAX_FRAMES = SHOWS[1] * SHOW_FRAMES[1] + (SHOWS[1] - 1) * GAP_FRAMES[1]  # 42


@dataclass(frozen=True)
class Clip:
    frames: torch.Tensor  # [F, C, S, S] uint8
    digits: tuple[int, ...]  # the shows' digits, in order

    def question(self, task: str, rng: random.Random) -> tuple[str, str]:
        """(question, answer) for one of QUESTIONS."""
        words = [number_to_english(d) for d in self.digits]
        if task == "sequence":
            return "which digits are shown, in order?", " ".join(words)
        if task == "count":
            digit = rng.choice(self.digits) if rng.random() < 0.8 else rng.randrange(10)
            asked = number_to_english(digit)
            return f"how many times is a {asked} shown?", number_to_english(
                self.digits.count(digit)
            )
        if task == "first":
            if rng.random() < 0.5:
                return "which digit is shown first?", words[0]
            return "which digit is shown last?", words[-1]
        raise ValueError(f"Unknown clip question {task!r}; questions are {QUESTIONS}.")


def _shifted(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """[C, S, S] moved by (dx, dy) pixels, the uncovered border black."""
    out = torch.zeros_like(image)
    S = image.shape[-1]
    xs, xd = (slice(0, S - dx), slice(dx, S)) if dx >= 0 else (slice(-dx, S), slice(0, S + dx))
    ys, yd = (slice(0, S - dy), slice(dy, S)) if dy >= 0 else (slice(-dy, S), slice(0, S + dy))
    out[:, yd, xd] = image[:, ys, xs]
    return out


def _distractor(shape: torch.Size, rng: random.Random) -> torch.Tensor:
    """Scattered bright specks, no digit."""
    frame = torch.zeros(shape, dtype=torch.uint8)
    S = shape[-1]
    for _ in range(rng.randint(3, 8)):
        y, x = rng.randrange(S - 2), rng.randrange(S - 2)
        frame[:, y : y + 2, x : x + 2] = rng.randint(128, 255)
    return frame


def make_clip(
    images: torch.Tensor,  # [N, C, S, S] uint8: the split's digit images
    labels: list[int],  # [N]
    rng: random.Random,
    min_frames: int = 8,
) -> Clip:
    """One clip from the given images (see the module docstring)."""
    shape = images.shape[1:]
    frames: list[torch.Tensor] = []
    digits = []
    for show in range(rng.randint(*SHOWS)):
        if show:
            for _ in range(rng.randint(*GAP_FRAMES)):
                blank = rng.random() < 0.5
                frames.append(
                    torch.zeros(shape, dtype=torch.uint8) if blank else _distractor(shape, rng)
                )
        i = rng.randrange(len(labels))
        digits.append(labels[i])
        x, y = rng.randint(-3, 3), rng.randint(-3, 3)  # where it enters
        vx, vy = rng.choice((-1, 0, 1)), rng.choice((-1, 0, 1))  # pixels per frame
        for _ in range(rng.randint(*SHOW_FRAMES)):
            frames.append(_shifted(images[i], x, y))
            x, y = max(-4, min(4, x + vx)), max(-4, min(4, y + vy))
    while len(frames) < min_frames:  # blank frames before or after, at random
        blank = torch.zeros(shape, dtype=torch.uint8)
        frames.insert(0 if rng.random() < 0.5 else len(frames), blank)
    return Clip(torch.stack(frames), tuple(digits))


def digit_clips(
    n: int, split: str, seed: int, split_seed: int, image_size: int = 32, channels: int = 1
) -> list[Clip]:
    """`n` clips drawn from one split of the digits, deterministically by `seed`."""
    images, labels, _ = digits_images(image_size, channels)
    index = digits_split(labels, split, split_seed)
    pool, pool_labels = images[torch.as_tensor(index)], [labels[i] for i in index]
    rng = random.Random(f"{split}:{seed}")
    return [make_clip(pool, pool_labels, rng) for _ in range(n)]


__all__ = ["MAX_FRAMES", "QUESTIONS", "Clip", "digit_clips", "make_clip"]
