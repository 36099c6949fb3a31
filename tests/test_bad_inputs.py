"""The catalogue of expected user errors: each bad input stops herd-train / herd-eval with
exit status 1 and one `herd: error:` line naming the culprit (no traceback).

Every case runs the entry point's own code path in-process (`report_errors` around
`train` / `evaluate` on a composed config), which is what `herd-train` does after Hydra
has parsed the command line; `test_train.py` checks the same through real subprocesses.
"""

from __future__ import annotations

import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from herd.evaluate import evaluate
from herd.train import train
from herd.utils.cli import report_errors

from .conftest import FAST, compose_cfg

TINY_VISION = [
    "experiment=vision_digits",
    "model.encoder.backbone_kwargs.embed_dim=32",
    "model.encoder.backbone_kwargs.depth=2",
    "model.encoder.backbone_kwargs.num_heads=2",
    "model.encoder.feature_layers=[0]",
    "model.encoder.n_gated_layers=0",
    "data.batch_size=2",
]
SPEECH = ["experiment=speech_digits", "data.batch_size=2"]


def exit_line(capsys, task, cfg) -> tuple[int, str]:
    """Run `task(cfg)` as the CLI does; return (exit status, stderr)."""
    with pytest.raises(SystemExit) as info:
        report_errors(task)(cfg)
    err = capsys.readouterr().err.strip()
    return info.value.code, err


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def wav(path: Path, seconds: float) -> Path:
    sf.write(path, np.zeros(int(16000 * seconds), dtype="float32"), 16000)
    return path


def a_language_checkpoint(tmp: Path) -> Path:
    cfg = compose_cfg(
        "train", [*FAST, "trainer.max_steps=1", "test=false", "callbacks.text_samples=null"], tmp
    )
    train(cfg)
    return tmp / "checkpoints" / "last.ckpt"


# (case id, function(tmp) -> (config name, overrides), expected message)
def _cases():
    def cfg(*overrides, name="train"):
        return lambda tmp: (name, [*overrides])

    def text_manifest(lines):
        return lambda tmp: (
            "train",
            [
                *FAST,
                "data.source=manifest",
                f"data.manifest={write_jsonl(tmp / 'text.jsonl', lines)}",
            ],
        )

    def image_manifest(lines, make=None):
        def build(tmp):
            if make:
                make(tmp)
            manifest = write_jsonl(tmp / "images.jsonl", lines)
            return "train", [*TINY_VISION, "data.source=manifest", f"data.path={manifest}"]

        return build

    def speech_manifest(lines, make=None):
        def build(tmp):
            if make:
                make(tmp)
            manifest = write_jsonl(tmp / "speech.jsonl", lines)
            return "train", [*SPEECH, "data.source=manifest", f"data.manifest={manifest}"]

        return build

    def corrupt_png(tmp):
        (tmp / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    def good_png(tmp):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp / "ok.png")

    def empty_wav(tmp):
        with wave.open(str(tmp / "empty.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)

    def with_checkpoint(*overrides, name="train", corrupt=False, foreign=False):
        def build(tmp):
            path = tmp / "file.ckpt"
            if corrupt:
                path.write_bytes(b"PK\x03\x04 cut short")
            elif foreign:
                torch.save({"state_dict": {}}, path)
            else:
                path = a_language_checkpoint(tmp / "lm")
            return name, [*overrides, f"ckpt_path={path}"]

        return build

    def with_pretrained(*overrides):
        def build(tmp):
            return "train", [*overrides, f"model.pretrained={a_language_checkpoint(tmp / 'lm')}"]

        return build

    def checkpoints_dir_is_a_file(*overrides):
        def build(tmp):
            (tmp / "run").mkdir()
            (tmp / "run" / "checkpoints").write_text("not a directory")
            return "train", [*overrides, "trainer.max_steps=2", "test=false"]

        return build

    return [
        # numeric settings, checked before any work
        ("zero batch size", cfg(*FAST, "data.batch_size=0"), r"data.batch_size=0 is not valid"),
        (
            "negative learning rate",
            cfg(*FAST, "model.optimizer.lr=-1"),
            r"model.optimizer.lr=-1 is not valid: it must be a number greater than 0",
        ),
        ("zero steps", cfg(*FAST, "trainer.max_steps=0"), r"trainer.max_steps=0 .* or -1 for no"),
        (
            "validation beyond an epoch",
            cfg(*FAST, "trainer.val_check_interval=1.5"),
            r"trainer.val_check_interval=1.5 is not valid",
        ),
        (
            "fraction above one",
            cfg(*TINY_VISION, "data.val_fraction=1.5"),
            r"data.val_fraction=1.5 is not valid: it must be a fraction in \[0, 1\]",
        ),
        (
            "negative workers",
            cfg(*SPEECH, "data.num_workers=-2"),
            r"data.num_workers=-2 is not valid: it must be a whole number of at least 0",
        ),
        (
            "batch size not a number",
            cfg(*TINY_VISION, "data.batch_size=many"),
            r"data.batch_size='many' is not valid",
        ),
        (
            "negative warmup",
            cfg(*SPEECH, "model.scheduler.warmup_steps=-5"),
            r"model.scheduler.warmup_steps=-5 is not valid",
        ),
        (
            "eval with a negative batch limit",
            with_checkpoint("trainer.limit_test_batches=-1", name="eval"),
            r"trainer.limit_test_batches=-1 is not valid",
        ),
        # paths a run writes
        (
            "checkpoint directory is a file",
            checkpoints_dir_is_a_file(*FAST),
            r"run/checkpoints: .*; check that the path exists and is writable",
        ),
        # configs
        ("fsdp on cpu", cfg(*FAST, "strategy=fsdp"), r"strategy=fsdp \(FSDP\) needs CUDA GPUs"),
        (
            "fp16 on cpu",
            cfg(*FAST, "precision=fp16_mixed"),
            r"precision=fp16_mixed .* needs a CUDA GPU",
        ),
        ("gpu on cpu", cfg(*FAST, "trainer.accelerator=gpu"), "no CUDA GPU is visible"),
        ("unknown flavor", cfg(*FAST, "model.llama.flavor=huge"), r"flavor=.huge. is not one of"),
        (
            "heads do not divide",
            cfg(*FAST, "model.llama.n_kv_heads=3"),
            "not divisible by n_kv_heads 3",
        ),
        (
            "data longer than model",
            cfg(*FAST, "data.seq_len=1024"),
            "longer than the model's max_seq_len",
        ),
        (
            "bad finetune strategy",
            cfg("experiment=fusion_digits", "finetune.strategy=most"),
            r"finetune.strategy='most' is not one of",
        ),
        (
            "bad lora rank",
            cfg("experiment=fusion_digits", "finetune=lora", "finetune.lora.rank=0"),
            "LoRA needs rank >= 1",
        ),
        (
            "bad nonfinite policy",
            cfg(*FAST, "callbacks.nonfinite.policy=ignore"),
            "policy='ignore' is not one of",
        ),
        (
            "unknown fusion task",
            cfg("experiment=fusion_digits", "+data.weights.ocr=1.0"),
            r"unknown tasks \['ocr'\]",
        ),
        (
            "manifest source without file",
            cfg(*FAST, "data.source=manifest"),
            "data.source=manifest needs data.manifest=PATH",
        ),
        # checkpoints
        (
            "missing checkpoint",
            cfg(*FAST, "ckpt_path=/nonexistent/last.ckpt"),
            "Checkpoint /nonexistent/last.ckpt does not exist",
        ),
        (
            "ckpt_path=last with none",
            cfg(*FAST, "ckpt_path=last"),
            "ckpt_path=last but .* does not exist",
        ),
        (
            "truncated checkpoint",
            with_checkpoint(*FAST, corrupt=True),
            r"file.ckpt could not be read",
        ),
        (
            "not a herd checkpoint",
            with_checkpoint(*FAST, foreign=True),
            "was not written by a herd system",
        ),
        (
            "checkpoint of another system",
            with_checkpoint(*TINY_VISION),
            "was written by herd.systems.language.LanguageSystem, but this run trains",
        ),
        (
            "checkpoint of other settings",
            with_checkpoint(*FAST, "model.llama.n_layers=3"),
            r"other model settings: model.llama.n_layers",
        ),
        (
            "pretrained with another tokenizer",
            with_pretrained(*FAST, "data.tokenizer=bytes"),
            r"trained with tokenizer 'herd_bpe', not 'bytes'; set data.tokenizer=herd_bpe",
        ),
        (
            "eval longer than checkpoint",
            with_checkpoint("context=2k", name="eval"),
            r"longer than this checkpoint's context of 512",
        ),
        # text
        (
            "text manifest missing",
            cfg(*FAST, "data.source=manifest", "data.manifest=/no/such.jsonl"),
            "Manifest /no/such.jsonl does not exist",
        ),
        (
            "text line not json",
            text_manifest(['{"text": "fine"}', "{not json"]),
            r"text.jsonl, line 2: Expecting property name",
        ),
        (
            "text line without text",
            text_manifest([{"body": "x"}]),
            r'text.jsonl, line 1: missing a string "text" field',
        ),
        # images
        ("image file missing", image_manifest([{"image": "gone.png", "label": 1}]), r"gone.png"),
        (
            "image file corrupt",
            image_manifest([{"image": "bad.png", "label": 1}], corrupt_png),
            r"bad.png",
        ),
        (
            "image label missing",
            image_manifest([{"image": "ok.png"}], good_png),
            r'images.jsonl, line 1: missing an integer or string "label"',
        ),
        # audio
        (
            "audio file missing",
            speech_manifest([{"audio": "gone.wav", "text": "one two"}]),
            r"speech.jsonl, line 1: audio file .*gone.wav does not exist",
        ),
        (
            "audio file empty",
            speech_manifest([{"audio": "empty.wav", "text": "one"}], empty_wav),
            r"speech.jsonl, line 1: .*empty",
        ),
        (
            "audio file corrupt",
            speech_manifest(
                [{"audio": "text.wav", "text": "one"}],
                lambda t: (t / "text.wav").write_text("not audio"),
            ),
            r"speech.jsonl, line 1: audio file .*text.wav cannot be decoded",
        ),
        (
            "audio clip too long",
            speech_manifest(
                [{"audio": "long.wav", "text": "one"}], lambda t: wav(t / "long.wav", 25.0)
            ),
            r"speech.jsonl, line 1: .*25.0 s long, longer than data.max_seconds=20",
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_stops_with_one_clear_line(build, message, tmp_path, capsys):
    name, overrides = build(tmp_path)
    cfg = compose_cfg(name, overrides, tmp_path / "run")
    task = evaluate if name == "eval" else train
    code, err = exit_line(capsys, task, cfg)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("herd: error:")]
    assert len(lines) == 1, err[-2000:]
    assert "Traceback" not in err
    assert re.search(message, lines[0]), lines[0]


def test_every_case_is_its_own_failure():
    """No two cases share a name (pytest ids) or an expected message (one test twice)."""
    names, messages = [c[0] for c in CASES], [c[2] for c in CASES]
    assert len(set(names)) == len(names)
    assert len(set(messages)) == len(messages)


def test_a_log_directory_that_cannot_be_created_is_one_line(tmp_path):
    """Hydra creates the run directory before herd's code runs; herd checks it first."""
    from .conftest import run_cli

    (tmp_path / "a-file").write_text("HERD_LOG_DIR points below this file")
    result = run_cli("herd.train", *FAST, log_dir=tmp_path / "a-file" / "logs")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("herd: error:")
    ]
    assert re.search(
        r"cannot create the run directory .*a-file/logs/train/runs/.* set HERD_LOG_DIR",
        result.stderr,
    )
