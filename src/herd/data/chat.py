"""The Llama 3 chat format for the fusion stage: samples with images and clips -> token
ids, labels and batches.

A sample is a conversation, usually one user turn and the assistant's answer:

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>

where a prompt may hold `<|image|>` (the decoder's cross-attention layers see the image from
there on) and `<|speech|>` (expanded to one placeholder per speech-adapter output, whose
embeddings replace the placeholders'). The loss is on the assistant's messages and their
<|eot_id|> only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from herd.data.packing import IGNORE_INDEX
from herd.data.tokenizer import IMAGE, SPEECH, VIDEO, Tokenizer


@dataclass
class Example:
    task: str
    prompt: str  # IMAGE / SPEECH markers: one per image / clip, in order
    answer: str
    images: tuple[torch.Tensor, ...] = ()  # [C, H, W] each, as the image encoder expects
    audio: tuple[torch.Tensor, ...] = ()  # [S] each, 16 kHz mono waveforms
    videos: tuple[torch.Tensor, ...] = ()  # [F, C, H, W] each, frames as images are
    # earlier messages of a conversation, (role, text with markers), before `prompt`; the
    # media of all of them are in `images` / `audio`, in order
    history: tuple[tuple[str, str], ...] = ()
    # what each clip says, in order, where known (the digits corpus): the targets of the
    # fusion stage's auxiliary CTC loss on the speech adapter (FusionSystem.speech_ctc_weight)
    transcripts: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- encoding

MEDIA_MARKERS = f"({re.escape(IMAGE)}|{re.escape(VIDEO)})"  # re.split keeps the markers


def prompt_ids(
    prompt: str,
    tokenizer: Tokenizer,
    clip_samples: list[int] | tuple[int, ...] = (),
    speech_tokens: Callable[[int], int] | None = None,
    task: str = "sample",
) -> list[int]:
    """A prompt with IMAGE / VIDEO / SPEECH markers -> token ids: one `<|image|>` per IMAGE,
    one `<|video|>` per VIDEO, and the k-th SPEECH becomes `speech_tokens(clip_samples[k])`
    placeholders (one per speech-adapter output)."""
    special = tokenizer.special_ids
    pieces = prompt.split(SPEECH)
    if len(pieces) - 1 != len(clip_samples):
        raise ValueError(
            f"A {task} prompt has {len(pieces) - 1} {SPEECH} marker(s) but "
            f"{len(clip_samples)} audio clip(s)."
        )
    if clip_samples and speech_tokens is None:
        raise ValueError(f"A {task} prompt has {SPEECH} but the model has no speech encoder.")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            ids += [special[SPEECH]] * speech_tokens(clip_samples[i - 1])
        for text in re.split(MEDIA_MARKERS, piece):
            if text in (IMAGE, VIDEO):
                ids.append(special[text])
            elif text:
                ids += tokenizer.encode(text)
    return ids


def chat_turns(
    turns: Sequence[tuple[str, Sequence[int] | str]],
    tokenizer: Tokenizer,
    train_on_prompt: bool = False,
) -> dict:
    """Messages in the chat format -> {"input_ids", "labels", "prompt_len"}. `turns` are
    (role, content): token ids for system and user messages (already tokenized, media
    placeholders included), text for the assistant's. Labels are next-token targets on the
    assistant messages and their <|eot_id|> only, or with `train_on_prompt` on every
    message's text (headers and media placeholders stay unlabelled); `prompt_len` counts the
    tokens before the last assistant message, the answer that generation is scored on."""
    eot = tokenizer.eot_id
    special = set(tokenizer.special_ids.values()) - {eot} if train_on_prompt else set()
    input_ids, is_answer, prompt_len = [tokenizer.bos_id], [False], 0
    for role, content in turns:
        header = tokenizer.header_ids(role)
        answer = role == "assistant"
        body = [*(tokenizer.encode(content) if answer else content), eot]
        input_ids += header
        prompt_len = len(input_ids) if answer else prompt_len
        input_ids += body
        if answer or not train_on_prompt:
            is_answer += [False] * len(header) + [answer] * len(body)
        else:  # the message's text, not its media placeholders
            is_answer += [False] * len(header) + [t not in special for t in body]
    # the token before an answer predicts its first token, ..., its last token predicts
    # <|eot_id|>, and <|eot_id|> itself predicts nothing
    labels = [t if a else IGNORE_INDEX for t, a in zip(input_ids[1:], is_answer[1:], strict=True)]
    return {"input_ids": input_ids, "labels": [*labels, IGNORE_INDEX], "prompt_len": prompt_len}


def encode_chat(
    messages: Sequence[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True
) -> list[int]:
    """Text messages [{"role", "content"}] -> token ids in the chat format (content trimmed,
    as Llama 3's chat template does), followed for generation by an open assistant header."""
    turns = [
        (
            m["role"],
            m["content"].strip()
            if m["role"] == "assistant"
            else tokenizer.encode(m["content"].strip()),
        )
        for m in messages
    ]
    ids = chat_turns(turns, tokenizer)["input_ids"]
    return ids + tokenizer.header_ids("assistant") if add_generation_prompt else ids


def chat_ids(
    user_ids: list[int],
    answer: str,
    tokenizer: Tokenizer,
    more_turns: Sequence[tuple[Sequence[int], str]] = (),
) -> dict:
    """A user turn (already tokenized) and the assistant's answer, then any `more_turns`
    (user ids, answer), in the chat format (see chat_turns)."""
    turns = [("user", user_ids), ("assistant", answer)]
    for user, text in more_turns:
        turns += [("user", user), ("assistant", text)]
    return chat_turns(turns, tokenizer)


def encode_example(
    example: Example,
    tokenizer: Tokenizer,
    speech_tokens: Callable[[int], int] | None = None,
    train_on_prompt: bool = False,
) -> dict:
    """Example -> {"input_ids", "labels", "prompt_len"} in the chat format: its earlier
    messages, then its prompt as a user turn and its answer (`train_on_prompt`: see
    chat_turns)."""
    clips = [a.shape[-1] for a in example.audio]
    turns: list[tuple[str, list[int] | str]] = []
    for role, text in [*example.history, ("user", example.prompt)]:
        if role == "assistant":
            turns.append((role, text))
            continue
        n = text.count(SPEECH)  # this message's clips, in order
        turns.append((role, prompt_ids(text, tokenizer, clips[:n], speech_tokens, example.task)))
        clips = clips[n:]
    return chat_turns([*turns, ("assistant", example.answer)], tokenizer, train_on_prompt)


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad text (pad_id / IGNORE_INDEX); stack each sample's images into [B, I, C, H, W]
    with image_mask [B, I], its clips into audio [B, K, S] with audio_lengths [B, K], and its
    videos into [B, V, F, C, H, W] with frame_mask [B, V, F] (zeros and False / 0 where a
    sample has fewer)."""
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(samples):
        input_ids[b, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        labels[b, : len(s["labels"])] = torch.tensor(s["labels"])
    batch = {
        "input_ids": input_ids,  # [B, T]
        "labels": labels,  # [B, T]
        "prompt_len": torch.tensor([s["prompt_len"] for s in samples]),  # [B]
        "task": [s["task"] for s in samples],
        "answer": [s["answer"] for s in samples],
    }
    extra = {k for s in samples for k in s} - {"input_ids", "labels", "prompt_len", "images"}
    for key in sorted(extra - {"task", "answer", "audio", "videos"}):  # e.g. evidence_distance
        batch[key] = [s.get(key) for s in samples]
    n_images = max(len(s["images"]) for s in samples)
    if n_images:
        shape = next(im.shape for s in samples for im in s["images"])
        images = torch.zeros(B, n_images, *shape)
        image_mask = torch.zeros(B, n_images, dtype=torch.bool)
        for b, s in enumerate(samples):
            for i, image in enumerate(s["images"]):
                images[b, i], image_mask[b, i] = image, True
        batch["images"], batch["image_mask"] = images, image_mask  # [B, I, C, H, W], [B, I]
    K = max(len(s["audio"]) for s in samples)
    if K:
        lengths = torch.zeros(B, K, dtype=torch.long)
        for b, s in enumerate(samples):
            for k, clip in enumerate(s["audio"]):
                lengths[b, k] = clip.shape[-1]
        audio = torch.zeros(B, K, int(lengths.max()))
        for b, s in enumerate(samples):
            for k, clip in enumerate(s["audio"]):
                audio[b, k, : lengths[b, k]] = clip
        batch["audio"], batch["audio_lengths"] = audio, lengths  # [B, K, S], [B, K]
    n_videos = max((len(s.get("videos", ())) for s in samples), default=0)
    if n_videos:
        clips = [v for s in samples for v in s["videos"]]
        n_frames, shape = max(v.shape[0] for v in clips), clips[0].shape[1:]
        videos = torch.zeros(B, n_videos, n_frames, *shape)
        frame_mask = torch.zeros(B, n_videos, n_frames, dtype=torch.bool)
        for b, s in enumerate(samples):
            for v, clip in enumerate(s["videos"]):
                videos[b, v, : len(clip)], frame_mask[b, v, : len(clip)] = clip, True
        batch["videos"], batch["frame_mask"] = videos, frame_mask  # [B, V, F, C, H, W], [B, V, F]
    return batch


__all__ = [
    "IGNORE_INDEX",
    "Example",
    "chat_ids",
    "chat_turns",
    "collate",
    "encode_example",
    "prompt_ids",
]
