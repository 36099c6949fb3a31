"""The fusion stage on a user's own chat manifest: parsing, encoding, bad lines, a real run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from herd.data.chat import IGNORE_INDEX, encode_example
from herd.data.chat_manifest import read_chat_manifests
from herd.data.tokenizer import IMAGE, RESERVED_FOR, SPEECH, VIDEO, load_tokenizer
from herd.errors import DataError

TOKENIZER = load_tokenizer("herd_bpe")
EXAMPLE = (
    Path(__file__).resolve().parents[1] / "src" / "herd" / "assets" / "chat" / "manifest.jsonl"
)
TASKS = {
    "figure": "top1",
    "larger": "exact",
    "figure_chat": "exact",
    "transcribe": "wer",
    "translate_audio": "bleu",
}


def speech_tokens(samples: int) -> int:
    return max(1, samples // 1280)  # one per 80 ms, as the speech adapter gives


def read(files, max_tokens=512, skip_bad=False, speech=True, max_video_frames=8):
    return read_chat_manifests(
        files,
        TOKENIZER,
        speech_tokens if speech else None,
        32,
        1,
        max_tokens,
        skip_bad,
        max_video_frames,
    )


def test_the_example_manifest_reads_into_conversations_with_their_media():
    by_split, metrics = read({"train": EXAMPLE})
    assert metrics == TASKS
    assert {s: len(v) for s, v in by_split.items()} == {"train": 40, "val": 10, "test": 10}
    special = TOKENIZER.special_ids
    for example in by_split["train"]:
        encoded = encode_example(example, TOKENIZER, speech_tokens)
        ids, labels, prompt_len = encoded["input_ids"], encoded["labels"], encoded["prompt_len"]
        assert ids.count(special[IMAGE]) == len(example.images)
        assert all(img.shape == (1, 32, 32) and img.min() >= -1 for img in example.images)
        if example.task == "figure_chat":  # two turns, two images, both answers supervised
            first = example.history[1][1]
            answers = [*TOKENIZER.encode(first), TOKENIZER.eot_id]
            answers += [*TOKENIZER.encode(example.answer), TOKENIZER.eot_id]
            assert len(example.images) == 2 and len(example.history) == 2
            assert [y for y in labels if y != IGNORE_INDEX] == answers
        # generation is scored on the last answer: it starts right at prompt_len
        last = TOKENIZER.encode(example.answer)
        assert ids[prompt_len : prompt_len + len(last)] == last
        if example.task == "transcribe":  # the system message opens the conversation
            assert TOKENIZER.decode(ids[:12], skip_special=False).count("system") == 1
            assert ids.count(special[SPEECH]) == speech_tokens(example.audio[0].shape[-1])


def write_manifest(tmp_path: Path, bad: dict | str | None, name: str = "chat.jsonl") -> Path:
    """A manifest whose first line is good (an example figure, its image copied beside)
    and whose second is `bad` (if any), with a corrupt file broken.png beside it."""
    good = json.loads(EXAMPLE.read_text().splitlines()[0])
    del good["split"]
    image = EXAMPLE.parent / good["messages"][0]["content"][0]["path"]
    (tmp_path / "images").mkdir(exist_ok=True)
    shutil.copy(image, tmp_path / "images" / "a.png")
    good["messages"][0]["content"][0]["path"] = "images/a.png"
    (tmp_path / "broken.png").write_text("not a png")
    write_frames(tmp_path / "frames", 12)
    lines = [json.dumps(good)]
    if bad is not None:
        lines.append(bad if isinstance(bad, str) else json.dumps(bad))
    manifest = tmp_path / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def chat(*user_parts, answer="seven", **extra) -> dict:
    messages = [{"role": "user", "content": list(user_parts)}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, **extra}


TEXT = {"type": "text", "text": "which digit?"}
BAD_LINES = [
    (
        chat({"type": "image", "path": "images/missing.png"}, TEXT),
        "image file .*missing.png does not exist",
    ),
    (chat({"type": "image", "path": "broken.png"}, TEXT), "cannot read image file .*broken.png"),
    (chat({"type": "audio", "path": "broken.png"}, TEXT), "cannot read audio file .*broken.png"),
    (chat({"type": "movie", "path": "x.mp4"}, TEXT), "unknown content part type 'movie'"),
    (chat({"type": "video", "path": "nowhere"}, TEXT), "video .*nowhere does not exist"),
    (chat({"type": "video", "path": "broken.png"}, TEXT), "cannot read video file .*broken.png"),
    (
        chat({"type": "video", "path": "frames"}, TEXT),
        "video .*frames has 12 frames, more than the video adapter's max_frames=8; sample it "
        'with a lower "fps"',
    ),
    (
        chat({"type": "video", "path": "frames", "fps": 2}, TEXT),
        'video folder .*frames has "fps" but no "frame_rate"',
    ),
    (
        chat({"type": "video", "path": "frames", "fps": 20, "frame_rate": 10}, TEXT),
        '"fps" 20 is faster than the clip\'s 10 frames a second',
    ),
    (
        chat({"type": "text", "text": "what does <|video|> show?"}),
        "text holds one of .*; give media as image/audio/video parts",
    ),
    (chat(TEXT, answer=None), "no assistant message"),
    (chat(TEXT, metric="f1"), "\"metric\" 'f1' is not one of"),
    (chat(TEXT, metric="wer", task="figure"), "task 'figure' is scored with 'top1'"),
    (
        chat({"type": "text", "text": "word " * 600}),
        "the sample is \\d+ tokens, longer than the context of 512",
    ),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown message role 'robot'"),
    ("{not json", "Expecting property name"),
]


@pytest.mark.parametrize("bad, reason", BAD_LINES)
def test_a_bad_line_is_named_or_skipped_and_counted(tmp_path, caplog, bad, reason):
    manifest = write_manifest(tmp_path, bad)
    val = write_manifest(tmp_path, None, "val.jsonl")
    with pytest.raises(DataError, match=f"chat.jsonl, line 2: {reason}"):
        read({"train": manifest, "val": val})
    with caplog.at_level(logging.WARNING):
        by_split, _ = read({"train": manifest, "val": val}, skip_bad=True)
    assert len(by_split["train"]) == 1 and "Skipped 1 bad line(s)" in caplog.text


def test_audio_without_a_speech_encoder_and_missing_splits_are_named(tmp_path):
    clip = {"type": "audio", "path": "clip.flac"}
    speech = Path(EXAMPLE.parent.parent / "speech" / "val")
    shutil.copy(next(speech.glob("*.flac")), tmp_path / "clip.flac")
    manifest = write_manifest(tmp_path, chat(clip, TEXT, split="val"))
    with pytest.raises(
        DataError, match="line 2: it holds audio but the fusion model has no speech"
    ):
        read({"train": manifest}, speech=False)
    only_train = write_manifest(tmp_path, None)
    with pytest.raises(DataError, match="no validation samples; give data.val_manifest=FILE"):
        read({"train": only_train})


def write_frames(folder: Path, n: int) -> list[int]:
    """n PNG frames named frame1..frameN (natural order differs from the names' sort order),
    frame k filled with gray level 10 * k; returns the levels in frame order."""
    from PIL import Image

    folder.mkdir(exist_ok=True)
    for k in range(1, n + 1):
        Image.new("L", (20, 20), 10 * k).save(folder / f"frame{k}.png")
    return [10 * k for k in range(1, n + 1)]


def levels(video) -> list[int]:
    """Each frame's gray level back from [-1, 1]."""
    return [round(float((frame.mean() + 1) * 127.5)) for frame in video]


def test_videos_read_from_a_frame_folder_or_an_animated_file_in_order_and_sampled(tmp_path):
    from PIL import Image

    write_frames(tmp_path / "clip", 12)  # 12 frames at 6 per second: 2 s
    gif = [Image.new("L", (20, 20), 40 * k) for k in range(1, 5)]  # 0.25, 0.25, 0.5, 1.0 s
    gif[0].save(
        tmp_path / "clip.gif", save_all=True, append_images=gif[1:], duration=[250, 250, 500, 1000]
    )
    question = {"type": "text", "text": "which digits, in order?"}
    lines = [
        chat({"type": "video", "path": "clip", "frame_rate": 6}, question, split="train"),
        chat({"type": "video", "path": "clip", "frame_rate": 6, "fps": 2}, question, split="val"),
        chat({"type": "video", "path": "clip.gif", "fps": 2}, question, split="train"),
        chat({"type": "video", "path": "clip.gif"}, question, split="train"),
    ]
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    by_split, _ = read({"train": manifest}, max_video_frames=12)
    every, sampled_gif, gif_frames = (ex.videos[0] for ex in by_split["train"])
    assert every.shape == (12, 1, 32, 32)
    assert levels(every) == [10 * k for k in range(1, 13)]  # frame2 before frame10
    assert levels(by_split["val"][0].videos[0]) == [10, 40, 70, 100]  # t = 0, 0.5, 1, 1.5 s
    assert levels(gif_frames) == [40, 80, 120, 160]
    assert levels(sampled_gif) == [40, 120, 160, 160]  # t = 0, 0.5, 1, 1.5 s of 2 s
    encoded = encode_example(by_split["train"][0], TOKENIZER, speech_tokens)
    assert encoded["input_ids"].count(TOKENIZER.special_ids[VIDEO]) == 1
    with pytest.raises(DataError, match="line 1: it holds a video but the fusion model has no"):
        read({"train": manifest}, max_video_frames=None)


def test_the_fusion_data_batches_a_manifests_videos_with_their_frame_mask(tmp_path):
    """source=manifest with video parts: clips of different lengths in one batch, padded
    and masked, the model's max_frames taken from its input spec."""
    from herd.data.chat_module import ChatInputSpec
    from herd.data.multimodal import FusionDataModule

    write_frames(tmp_path / "long", 6)
    write_frames(tmp_path / "short", 3)
    lines = [
        chat({"type": "video", "path": name}, TEXT, split=split)
        for name in ("long", "short")
        for split in ("train", "val")
    ]
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = FusionDataModule(source="manifest", manifest=str(manifest), batch_size=2)
    data.setup_for(ChatInputSpec(TOKENIZER, None, None, 32, 1, max_video_frames=6))
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch["videos"].shape == (2, 1, 6, 1, 32, 32)
    assert batch["frame_mask"][:, 0].sum(-1).tolist() == [6, 3]
    data = FusionDataModule(source="manifest", manifest=str(manifest), batch_size=2)
    data.setup_for(ChatInputSpec(TOKENIZER, None, None, 32, 1, max_video_frames=4))
    with pytest.raises(DataError, match="line 1: video .*long has 6 frames, more than"):
        data.setup()


def llama3_style_checkpoint(path: Path) -> Path:
    """A tiny random Llama in the Hugging Face layout whose tokenizer, like a released
    Llama 3.1's, has reserved special tokens but no <|image|> or <|speech|>."""
    from .test_pretrained import tiny_hf_checkpoint_with_tokenizer

    tiny_hf_checkpoint_with_tokenizer(path)
    text = (path / "tokenizer.json").read_text()
    for token, reserved in RESERVED_FOR.items():
        assert text.count(json.dumps(token)) >= 1
        text = text.replace(json.dumps(token), json.dumps(reserved))
    (path / "tokenizer.json").write_text(text)
    return path


def test_a_llama3_tokenizer_places_media_on_reserved_tokens(tmp_path):
    tokenizer = load_tokenizer(str(llama3_style_checkpoint(tmp_path / "llama")))
    for token, reserved in RESERVED_FOR.items():
        assert tokenizer.special_ids[token] == TOKENIZER.special_ids[token]  # the same rows
        assert reserved not in TOKENIZER.special_ids
    assert tokenizer.decode([tokenizer.special_ids[IMAGE], *tokenizer.encode("seven")]) == "seven"


@pytest.mark.slow
def test_the_fusion_stage_trains_on_a_chat_manifest_from_a_released_style_llama(tmp_path):
    """experiment=fusion_manifest: a Hugging Face Llama directory underneath, the example
    manifest's five tasks each scored with its own metric."""
    from herd.systems.common import load_system
    from herd.train import train

    from .conftest import compose_cfg
    from .test_fusion import TINY_FUSION

    llama = llama3_style_checkpoint(tmp_path / "llama")
    overrides = [o for o in TINY_FUSION[1:] if not o.startswith(("data.", "model.language"))]
    cfg = compose_cfg(
        "train",
        [
            "experiment=fusion_manifest",
            f"pretrained={llama}",
            f"data.manifest={EXAMPLE}",
            "data.batch_size=8",
            *overrides,
        ],
        tmp_path / "run",
    )
    train(cfg)
    system = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert system.model.decoder.config.dim == 64  # the checkpoint's decoder, not a flavor
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for task, metric in TASKS.items():
        assert 0 <= saved[f"test/{task}/{metric}"] <= (100 if metric == "bleu" else 2), task
    # the trivial baselines beside them
    assert saved["test/transcribe/wer_empty"] == 1.0
    assert 0 <= saved["test/figure/top1_majority"] <= 1

    # exported (decoder + adapters) and reopened by herd-eval: the same answers as last.ckpt
    from herd.evaluate import evaluate
    from herd.export import export

    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "export")
    data = ["data=fusion", "++data.source=manifest", f"++data.manifest={EXAMPLE}"]
    scores = [
        evaluate(compose_cfg("eval", [f"ckpt_path={ckpt}", *data], tmp_path / name))
        for name, ckpt in (
            ("eval_ckpt", tmp_path / "run" / "checkpoints" / "last.ckpt"),
            ("eval_export", out),
        )
    ]
    assert scores[0]["test/figure/top1"] == scores[1]["test/figure/top1"]
    assert scores[0]["test/loss"] == pytest.approx(scores[1]["test/loss"], rel=1e-4)
