"""A user's own multimodal data for the fusion stage: a JSONL chat manifest.

One conversation per line, in the shape multimodal chat data usually takes:

    {"messages": [
        {"role": "system", "content": "You answer in one word."},              (optional)
        {"role": "user", "content": [
            {"type": "image", "path": "figures/fig1.png"},
            {"type": "audio", "path": "clips/remark.wav"},
            {"type": "text", "text": "Which digit does the figure show?"}]},
        {"role": "assistant", "content": "seven"}],
     "task": "figure", "metric": "top1", "split": "train"}

- `content` is a string or a list of parts of type `text`, `image` (a path), `audio` (a
  path) or `video` (see below); paths are relative to the manifest. Any number of images
  and clips, in any message but the assistant's (text only).
- A `video` part is `{"type": "video", "path": P, "fps": R}`: P is a folder of frames
  (image files, in natural name order: frame2 before frame10, with the folder's capture
  rate as `"frame_rate"`) or an animated GIF / WebP / PNG file (its rate from the frame
  durations). `fps` (optional) samples the clip at that rate, no faster than the source;
  without it every frame is kept. A clip holds at most the video adapter's `max_frames`.
- The loss is on the assistant messages; the last one is the answer that validation and
  test generate and score with the task's `metric`: `exact` / `top1` (exact match),
  `wer`, `bleu`, or `none` (loss only; the default). `task` defaults to "chat"; one task
  has one metric.
- The split is the line's `split` field (train / val / test), else the file's: the
  training manifest, `val_manifest` or `test_manifest`.

A bad line stops the run naming the file, the line and the reason (a missing or unreadable
image, clip or frame, a video longer than the adapter takes, an unknown part type or role, no assistant message, a sample longer than the
context), or with `skip_bad_samples` is skipped and counted.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from herd.data.audio import read_audio
from herd.data.chat import Example, encode_example
from herd.data.images import load_image, pil_to_tensor
from herd.data.manifest import read_jsonl_manifest
from herd.data.tokenizer import IMAGE, SPEECH, VIDEO, Tokenizer
from herd.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
METRICS = ("exact", "top1", "wer", "bleu", "none")
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "audio", "video")
MARKERS = {"image": IMAGE, "audio": SPEECH, "video": VIDEO}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _natural_key(path: Path) -> list:
    """frame2 before frame10: runs of digits compare as numbers."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def _sample_times(starts: list[float], end: float, fps: float | None) -> list[int]:
    """Indices of the frames on screen at t = k / fps, for t before `end` (the clip's length
    in seconds; frame i shows from starts[i]); every frame without fps."""
    if fps is None:
        return list(range(len(starts)))
    if isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0:
        raise ValueError(f'"fps" {fps!r} is not a positive number')
    source_rate = len(starts) / end
    if fps > source_rate * (1 + 1e-6):
        raise ValueError(f'"fps" {fps} is faster than the clip\'s {source_rate:g} frames a second')
    n = math.ceil(end * fps - 1e-9)
    return [bisect.bisect_right(starts, k / fps + 1e-9) - 1 for k in range(n)]


def read_video(part: dict, file: Path, image_size: int, channels: int) -> torch.Tensor:
    """A video part's frames -> uint8 [F, C, S, S]: a folder of frames at `frame_rate`, or
    an animated image file; sampled at `fps` when given (see the module docstring)."""
    from PIL import Image, ImageSequence

    fps = part.get("fps")
    if file.is_dir():
        paths = sorted(
            (p for p in file.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key
        )
        if not paths:
            raise ValueError(f"video folder {file} holds no frames ({', '.join(FRAME_SUFFIXES)})")
        rate = part.get("frame_rate")
        if rate is None and fps is not None:
            raise ValueError(f'video folder {file} has "fps" but no "frame_rate"')
        if isinstance(rate, bool) or not isinstance(rate, int | float | None) or (rate or 1) <= 0:
            raise ValueError(f'"frame_rate" {rate!r} is not a positive number')
        rate = float(rate or 1.0)  # without fps the rate only orders the frames
        picked = _sample_times([i / rate for i in range(len(paths))], len(paths) / rate, fps)
        frames = []
        for i in picked:
            try:
                frames.append(load_image(paths[i], image_size, channels))
            except (OSError, ValueError, SyntaxError) as exc:
                raise ValueError(f"cannot read frame {paths[i]} ({exc})") from exc
        return torch.stack(frames)
    if "frame_rate" in part:
        raise ValueError(f'"frame_rate" is for a folder of frames; {file} carries its own')
    with Image.open(file) as img:  # an animated GIF / WebP / PNG; a still image is one frame
        durations, frames = [], []
        for frame in ImageSequence.Iterator(img):
            durations.append(max(1, int(frame.info.get("duration") or 100)) / 1000)  # seconds
            frames.append(pil_to_tensor(frame, image_size, channels))
    times = [0.0, *itertools.accumulate(durations[:-1])]
    picked = _sample_times(times, sum(durations), fps)
    return torch.stack([frames[i] for i in picked])


def _message_text(message: dict, root: Path, media: dict) -> str:
    """A message's content as text with IMAGE / SPEECH / VIDEO markers; its images, clips
    and videos are decoded into media["images"] / ["audio"] / ["videos"] in order."""
    content = message.get("content")
    role = message.get("role")
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ValueError(f"a {role} message's content is neither a string nor a list of parts")
    pieces = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in PART_TYPES:
            raise ValueError(f"unknown content part type {kind!r}; use one of {list(PART_TYPES)}")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError('a text part has no string "text"')
            if any(marker in text for marker in MARKERS.values()):
                raise ValueError(
                    f"text holds one of {list(MARKERS.values())}; give media as "
                    f"{'/'.join(MARKERS)} parts"
                )
            pieces.append(text)
            continue
        if role == "assistant":
            raise ValueError(f"an assistant message holds an {kind} part; answers are text")
        path = part.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f'an {kind} part has no string "path"')
        file = root / path
        if kind == "video":
            media["videos"].append(_video_part(part, file, media))
            pieces.append(VIDEO)
            continue
        if not file.is_file():
            raise ValueError(f"{kind} file {file} does not exist")
        try:
            if kind == "image":
                image = load_image(file, media["image_size"], media["channels"])
                media["images"].append(image / 127.5 - 1.0)  # [C, S, S] in [-1, 1]
            else:
                media["audio"].append(read_audio(file))  # [S] at 16 kHz
        except (OSError, ValueError, RuntimeError, SyntaxError) as exc:
            raise ValueError(f"cannot read {kind} file {file} ({exc})") from exc
        pieces.append(IMAGE if kind == "image" else SPEECH)
    return "".join(pieces)


def _video_part(part: dict, file: Path, media: dict) -> torch.Tensor:
    """A video part's frames, scaled to [-1, 1] as images are: [F, C, S, S]."""
    max_frames = media["max_video_frames"]
    if max_frames is None:
        raise ValueError("it holds a video but the fusion model has no video adapter (model.video)")
    if not file.exists():
        raise ValueError(f"video {file} does not exist")
    try:
        frames = read_video(part, file, media["image_size"], media["channels"])
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read video file {file} ({exc})") from exc
    if len(frames) > max_frames:
        raise ValueError(
            f"video {file} has {len(frames)} frames, more than the video adapter's "
            f'max_frames={max_frames}; sample it with a lower "fps" or raise model.video.max_frames'
        )
    return frames / 127.5 - 1.0


def parse_chat_line(
    record: dict,
    root: Path,
    default_split: str,
    image_size: int,
    channels: int,
    has_speech: bool,
    max_video_frames: int | None = None,
) -> tuple[str, Example, str]:
    """One manifest object -> (split, Example, metric); ValueError names what is wrong."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError('missing a non-empty "messages" list')
    task = record.get("task", "chat")
    if not isinstance(task, str) or not task or "/" in task or "." in task:
        raise ValueError(f'"task" {task!r} must be a name without "/" or "."')
    metric = record.get("metric", "none")
    if metric not in METRICS:
        raise ValueError(f'"metric" {metric!r} is not one of {list(METRICS)}')
    split = record.get("split", default_split)
    if split not in SPLITS:
        raise ValueError(f'"split" {split!r} is not one of {list(SPLITS)}')
    media = {
        "images": [],
        "audio": [],
        "videos": [],
        "image_size": image_size,
        "channels": channels,
        "max_video_frames": max_video_frames,
    }
    turns = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"unknown message role {role!r}; use one of {list(ROLES)}")
        turns.append((role, _message_text(message, root, media)))
    if media["audio"] and not has_speech:
        raise ValueError("it holds audio but the fusion model has no speech encoder")
    last = max((k for k, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise ValueError("no assistant message: nothing to learn or score")
    if last != len(turns) - 1:
        raise ValueError("messages after the last assistant message would never be read")
    if last == 0 or turns[last - 1][0] != "user":
        raise ValueError("the last assistant message does not answer a user message")
    *history, (_, prompt), (_, answer) = turns
    if not answer.strip():
        raise ValueError("the last assistant message is empty")
    example = Example(
        task=task,
        prompt=prompt,
        answer=answer.strip(),
        images=tuple(media["images"]),
        audio=tuple(media["audio"]),
        videos=tuple(media["videos"]),
        history=tuple(history),
    )
    return split, example, metric


def read_chat_manifests(
    files: dict[str, str | Path | None],
    tokenizer: Tokenizer,
    speech_tokens: Callable[[int], int] | None,
    image_size: int,
    channels: int,
    max_tokens: int,
    skip_bad: bool = False,
    max_video_frames: int | None = None,
) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """{split: examples} and {task: metric} from chat manifests ({split: path or None}:
    the train manifest may also hold val/test lines by their `split` field)."""
    by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    task_metric: dict[str, str] = {}
    for default_split, path in files.items():
        if not path:
            continue

        def parse(record: dict, root: Path, default_split=default_split):
            split, example, metric = parse_chat_line(
                record,
                root,
                default_split,
                image_size,
                channels,
                speech_tokens is not None,
                max_video_frames,
            )
            if task_metric.get(example.task, metric) != metric:
                raise ValueError(
                    f"task {example.task!r} is scored with {task_metric[example.task]!r} on an "
                    f"earlier line and {metric!r} here; a task has one metric"
                )
            tokens = len(encode_example(example, tokenizer, speech_tokens)["input_ids"])
            if tokens > max_tokens:
                raise ValueError(
                    f"the sample is {tokens} tokens, longer than the context of {max_tokens}; "
                    "pick a longer context= or shorten it"
                )
            task_metric[example.task] = metric
            return split, example

        for (split, example), _ in read_jsonl_manifest(path, parse, skip_bad, "conversations"):
            by_split[split].append(example)
    if not by_split["train"]:
        raise DataError(
            f"The chat manifest(s) {list(filter(None, files.values()))} hold no training samples."
        )
    if not by_split["val"]:
        raise DataError(
            "The chat manifest(s) hold no validation samples; give data.val_manifest=FILE or "
            'lines with "split": "val".'
        )
    if not by_split["test"]:
        log.warning("The chat manifest(s) hold no test samples; testing on the validation ones.")
        by_split["test"] = list(by_split["val"])
    return by_split, task_metric


__all__ = ["METRICS", "parse_chat_line", "read_chat_manifests", "read_video"]
