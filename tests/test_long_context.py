"""Staged context extension and passkey retrieval."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from herd.callbacks.passkey import ANSWER_ROOM, passkey_accuracy
from herd.data.packing import StagedPackedStream
from herd.data.passkey import (
    NEEDLE,
    QUESTION,
    REPEATED_FILLER,
    make_passkey_sample,
    passkey_training_documents,
)
from herd.data.tokenizer import load_tokenizer
from herd.evaluate import evaluate
from herd.models.llama import Llama, LlamaConfig
from herd.systems.losses import IGNORE_INDEX
from herd.train import train

from .conftest import compose_cfg

DOCS = [[100 + i] * (5 + i % 17) for i in range(200)]


def test_stream_grows_rows_at_the_configured_steps():
    stream = StagedPackedStream(DOCS, [(0, 16), (3, 32), (5, 64)], tokens_per_batch=64)
    batches = [b for b, _ in zip(stream, range(7), strict=False)]
    assert [tuple(b["input_ids"].shape) for b in batches] == [(4, 16)] * 3 + [(2, 32)] * 2 + [
        (1, 64)
    ] * 2
    for b in batches:  # labels never cross documents
        crossing = b["doc_ids"][:, :-1] != b["doc_ids"][:, 1:]
        assert (b["labels"][:, :-1][crossing] == IGNORE_INDEX).all()


def test_stream_resumes_exactly_mid_schedule():
    full = StagedPackedStream(DOCS, [(0, 16), (3, 32), (5, 64)], tokens_per_batch=64, seed=3)
    reference = [b for b, _ in zip(full, range(9), strict=False)]
    resumed = StagedPackedStream(DOCS, [(0, 16), (3, 32), (5, 64)], tokens_per_batch=64, seed=3)
    resumed.step = 4
    for expected, got in zip(reference[4:], resumed, strict=False):
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_stream_with_whole_documents_keeps_short_documents_in_one_row():
    stages = [(0, 16), (3, 32), (5, 64)]
    stream = StagedPackedStream(DOCS, stages, 64, seed=1, pad_id=0, whole_documents=True)
    reference = [b for b, _ in zip(stream, range(8), strict=False)]
    for b in reference:
        seq_len = b["input_ids"].shape[1]
        for tokens, docs in zip(b["input_ids"].tolist(), b["doc_ids"].tolist(), strict=True):
            runs = [list(g) for _, g in itertools.groupby(zip(docs, tokens, strict=True))]
            for run in runs:
                doc, token = run[0]
                if doc >= 0:  # DOCS[i] is [100 + i] * (5 + i % 17)
                    length = 5 + (token - 100) % 17
                    assert len(run) == length or length > seq_len
    resumed = StagedPackedStream(DOCS, stages, 64, seed=1, pad_id=0, whole_documents=True)
    resumed.step = 4
    for expected, got in zip(reference[4:], resumed, strict=False):
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def passkey_document_layout(tok, doc: list[int]) -> tuple[int, int]:
    """(tokens before the key, tokens from the key's needle to the question) of a training doc."""
    text = tok.decode(doc[1:])
    key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\. ", text)
    assert key and text.endswith(f"What is the pass key? The pass key is {key.group(1)}.")
    needle = tok.encode(NEEDLE.format(key=key.group(1)))
    start = next(i for i in range(len(doc)) if doc[i : i + len(needle)] == needle)
    question = len(doc) - len(tok.encode(f"{QUESTION} {key.group(1)}.")) - 1
    return start - 1, question - start - len(needle)


@pytest.mark.parametrize("seq_len", [512, 2048])
def test_passkey_documents_mix_short_ones_with_distant_keys(seq_len):
    tok = load_tokenizer("herd_bpe")
    docs = passkey_training_documents(tok, 1000, random.Random(0), seq_len)
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    assert max(map(len, docs)) == seq_len  # the longest fill a row ...
    before, distance = zip(*(passkey_document_layout(tok, d) for d in docs), strict=True)
    # ... so a full-length prompt's key is no further back than the furthest trained ones
    full = make_passkey_sample(tok, seq_len - ANSWER_ROOM, 0.0, random.Random(0))
    full_doc = [*full.tokens, *tok.encode(full.answer + "."), tok.eos_id]
    assert max(distance) >= 0.98 * passkey_document_layout(tok, full_doc)[1]
    short, long = sorted(map(len, docs[::2])), distance[1::2]
    assert short[len(short) // 2] < seq_len // 3  # half are short: many examples per token ...
    assert sum(d > seq_len // 2 for d in long) > 150  # ... half put keys up to a row back
    # the key sits at any token of the filler, mid-sentence too, as in evaluation prompts
    sentence = len(tok.encode(REPEATED_FILLER))
    assert len({b % sentence for b in before}) == sentence


def test_bad_stages_are_refused():
    with pytest.raises(ValueError, match="must start at step 0"):
        StagedPackedStream(DOCS, [(2, 16)], 64)
    with pytest.raises(ValueError, match="increasing steps"):
        StagedPackedStream(DOCS, [(0, 16), (0, 32)], 64)


def context_lengths(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/context_len")]


def losses(run_dir: Path) -> list[float]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


@pytest.mark.slow
def test_staged_training_run_logs_the_schedule_and_resumes_in_the_right_stage(train_cfg, tmp_path):
    common = [
        "context=2k",
        "data.batch_size=1",
        "data.context_stages=[[0,512],[4,1024],[7,2048]]",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=1",
        "test=false",
        "model.scheduler=null",  # a constant rate: the 5-step run then is a prefix of the 9-step one
    ]
    cfg = train_cfg(*common, "trainer.max_steps=9")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert context_lengths(run) == [512] * 4 + [1024] * 3 + [2048] * 2
    uninterrupted = losses(run)

    # the short-context check after an extension: the schedule does not bind herd-eval
    at_512 = compose_cfg(
        "eval",
        [
            f"ckpt_path={run / 'checkpoints/last.ckpt'}",
            "context=512t",
            "trainer.limit_test_batches=2",
        ],
        tmp_path / "at_512",
    )
    assert 0 < evaluate(at_512)["test/loss"] < 9.0

    # the same run, stopped after step 5 and resumed from its checkpoint
    first = train_cfg(*common, "trainer.max_steps=5")
    first.paths.output_dir = str(tmp_path / "first")
    train(first)
    resumed = train_cfg(
        *common, "trainer.max_steps=9", f"ckpt_path={tmp_path / 'first/checkpoints/last.ckpt'}"
    )
    resumed.paths.output_dir = str(tmp_path / "resumed")
    train(resumed)
    assert context_lengths(tmp_path / "resumed") == [1024] * 2 + [2048] * 2
    torch.testing.assert_close(losses(tmp_path / "resumed"), uninterrupted[5:], atol=1e-4, rtol=0)


def test_passkey_prompt_has_the_length_and_the_key_at_the_depth():
    tok = load_tokenizer("herd_bpe")
    for depth in (0.0, 0.5, 1.0):
        sample = make_passkey_sample(tok, 300, depth, random.Random(0))
        assert len(sample.tokens) == 300
        text = tok.decode(sample.tokens)
        key = sample.answer.strip()
        position = text.index(f"pass key is {key}") / len(text)
        assert abs(position - depth) < 0.15
        assert text.endswith("What is the pass key? The pass key is")


def test_passkey_accuracy_counts_exact_answers():
    tok = load_tokenizer("herd_bpe")
    model = Llama(LlamaConfig.from_flavor("tiny", vocab_size=tok.vocab_size))
    grid = passkey_accuracy(model, tok, [64, 128], [0.0, 1.0], samples_per_cell=2)
    assert set(grid) == {(64, 0.0), (64, 1.0), (128, 0.0), (128, 1.0)}
    assert all(v == 0.0 for v in grid.values())  # an untrained model never guesses five digits


@pytest.mark.slow
def test_passkey_callback_writes_metrics_and_heatmap(train_cfg):
    cfg = train_cfg(
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "+callbacks.passkey._target_=herd.callbacks.PasskeyRetrieval",
        "+callbacks.passkey.lengths=[128,256,1024]",
        "+callbacks.passkey.samples_per_cell=1",
        "+callbacks.passkey.filler=needle",
    )
    metrics = train(cfg)
    assert {"test/passkey_acc@128", "test/passkey_acc@256", "test/passkey_acc"} <= set(metrics)
    assert "test/passkey_acc@1024" not in metrics  # longer than the 512-token context: skipped
    assert (Path(cfg.paths.output_dir) / "passkey_heatmap.png").stat().st_size > 1000


def test_passkey_prompts_leave_room_for_the_answer_at_the_full_context():
    """A model that has learnt to copy the key must score 100% at its own context length."""
    tok = load_tokenizer("herd_bpe")
    model = Llama(LlamaConfig.from_flavor("tiny", vocab_size=tok.vocab_size, max_seq_len=128))

    def copy_the_key(tokens, **kwargs):  # stands in for a perfect model: answers the needle's key
        text = tok.decode(tokens[0].tolist())
        key = text.split("The pass key is ")[1][:5]
        answer = torch.tensor([tok.encode(" " + key + ".")])
        return torch.cat([tokens, answer], dim=1)[:, : model.config.max_seq_len]

    import herd.callbacks.passkey as passkey_module

    original = passkey_module.generate
    passkey_module.generate = lambda m, tokens, **kw: copy_the_key(tokens, **kw)
    try:
        grid = passkey_accuracy(model, tok, [128], [0.0, 0.5, 1.0], samples_per_cell=3)
    finally:
        passkey_module.generate = original
    assert all(v == 1.0 for v in grid.values())
