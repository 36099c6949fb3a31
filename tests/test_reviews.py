"""Review documents: what they hold, where their evidence sits, how they are cut to a
context, and a short real fusion run on them at two contexts."""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import pytest
import torch

from herd.data.chat import IGNORE_INDEX, chat_ids
from herd.data.chat_module import ChatInputSpec
from herd.data.reviews import (
    REVIEW_TASKS,
    ReviewDataModule,
    ReviewDocument,
    Segment,
    truncate,
)
from herd.data.tokenizer import load_tokenizer
from herd.errors import ConfigError, DataError

from .conftest import compose_cfg

TOKENIZER = load_tokenizer("herd_bpe")
ASSISTANT_HEADER = chat_ids([], "", TOKENIZER)["prompt_len"] - chat_ids([-1], "", TOKENIZER)[
    "input_ids"
].index(-1)


def speech_tokens(samples: int) -> int:
    return max(1, samples // 1280)  # one per 80 ms, as the speech adapter gives


def constructed(kinds_and_lengths, evidence: int, tail: int = 10) -> ReviewDocument:
    segments = [Segment(kind, array("i", [7] * n)) for kind, n in kinds_and_lengths]
    doc = ReviewDocument("figure", segments, array("i", [8] * 4), "seven", evidence)
    doc.tokens = sum(n for _, n in kinds_and_lengths) + tail  # + frame, question, answer
    return doc


def test_truncation_keeps_the_question_and_counts_lost_evidence():
    # prose 30 | figure 5 (evidence) | prose 40, and 10 tokens of question, frame and answer
    doc = constructed([("prose", 30), ("figure", 5), ("prose", 40)], evidence=1)
    assert truncate(doc, 85, "drop_front") == (0, 0, False)  # fits: nothing cut
    assert truncate(doc, 80, "drop_front") == (0, 5, False)  # prose loses 5 tokens only
    assert truncate(doc, 56, "drop_front") == (0, 29, False)  # one prose token left
    # a figure goes whole: cutting 30 tokens drops the prose, 31 drops the figure too
    assert truncate(doc, 55, "drop_front") == (1, 0, False)
    assert truncate(doc, 54, "drop_front") == (2, 0, True)
    assert truncate(doc, 11, "drop_front") == (2, 39, True)
    with pytest.raises(DataError, match="do not fit a context of 9 tokens"):
        truncate(doc, 9, "drop_front")
    with pytest.raises(DataError, match="longer than the context of 80"):
        truncate(doc, 80, "error")


def small_reviews(**settings) -> ReviewDataModule:
    """Review documents of 200-1500 tokens at a 512-token context, set up outside a trainer."""
    defaults = {"doc_tokens": [200, 1500], "max_tokens": 512, "train_docs": 40}
    defaults.update(val_per_task=2, test_per_task=6, recording_seconds=[4.0, 8.0])
    data = ReviewDataModule(**{**defaults, **settings})
    data.setup_for(ChatInputSpec(TOKENIZER, speech_tokens, 16_000, image_size=32, channels=1))
    data.setup("fit")
    return data


def test_a_speech_encoder_at_another_sample_rate_is_refused():
    spec = ChatInputSpec(TOKENIZER, speech_tokens, 8_000, image_size=32, channels=1)
    with pytest.raises(ConfigError, match="reads 8000 Hz audio, but the fusion stage's data"):
        ReviewDataModule().setup_for(spec)


@pytest.fixture(scope="module")
def reviews():
    return small_reviews(seed=1)


def test_documents_hold_every_part_and_their_evidence_where_recorded(reviews):
    test = reviews.datasets["test"]
    assert sorted({d.task for d in test.documents}) == sorted(REVIEW_TASKS)
    special = TOKENIZER.special_ids
    for i, doc in enumerate(test.documents):
        full = test[(i, 10**6)]  # uncut
        ids, prompt_len = full["input_ids"], full["prompt_len"]
        assert len(ids) == doc.tokens and not full["truncated"]
        assert ids.count(special["<|image|>"]) == len(full["images"]) >= 1
        # the evidence segment starts evidence_distance tokens before the prompt's end
        start = prompt_len - full["evidence_distance"]
        evidence = list(doc.segments[doc.evidence].ids)
        assert ids[start : start + len(evidence)] == evidence
        # labels: the answer and <|eot_id|> only
        answer = [y for y in full["labels"] if y != IGNORE_INDEX]
        assert answer == [*TOKENIZER.encode(doc.answer), TOKENIZER.eot_id]
    kinds = {s.kind for d in test.documents for s in d.segments}
    assert kinds >= {"prose", "figure", "recording", "passage"}
    lengths = [d.tokens for d in test.documents]
    assert min(lengths) >= 150 and max(lengths) > 700  # spread over doc_tokens


def test_test_documents_are_fixed_by_the_split_seed_not_the_training_seed(reviews):
    other = small_reviews(seed=2)
    same = [(d.answer, d.tokens) for d in other.datasets["test"].documents]
    assert same == [(d.answer, d.tokens) for d in reviews.datasets["test"].documents]
    assert [d.answer for d in other.datasets["train"].documents] != [
        d.answer for d in reviews.datasets["train"].documents
    ]


def test_training_documents_can_ask_about_every_item(reviews):
    """train_questions=all: a turn per item of a trained task, each answer supervised, the
    count of tokens exact; test documents stay the one-question documents of `one`."""
    every = small_reviews(
        seed=1,
        train_questions="all",
        weights={"passkey": 0.0, "figure": 1.0, "translate": 1.0, "transcribe": 1.0},
    )
    one = small_reviews(
        seed=1, weights={"passkey": 0.0, "figure": 1.0, "translate": 1.0, "transcribe": 1.0}
    )
    assert [(d.answer, d.tokens) for d in every.datasets["test"].documents] == [
        (d.answer, d.tokens) for d in one.datasets["test"].documents
    ]
    train = every.datasets["train"]
    eot = TOKENIZER.eot_id
    for i, doc in enumerate(train.documents):
        items = [s for s in doc.segments if s.kind in ("figure", "recording", "passage")]
        assert len(doc.followups) == len(items) - 1 >= 2  # one figure, recording, passage at least
        full = train[(i, 10**6)]
        assert len(full["input_ids"]) == doc.tokens
        answers = [doc.answer, *(a for _, a in doc.followups)]
        labels = full["labels"]
        expected = [t for a in answers for t in [*TOKENIZER.encode(a), eot]]
        assert [y for y in labels if y != IGNORE_INDEX] == expected
        # each follow-up question sits in its own user turn, right before its answer
        text = TOKENIZER.decode(full["input_ids"])
        for q, a in doc.followups:
            assert text.index(TOKENIZER.decode(list(q))) < text.rindex(a)
    # the answer tokens per batch the fusion system weighs its loss by count them all
    assert every.answer_tokens_per_batch > 2 * one.answer_tokens_per_batch


def test_a_cut_document_keeps_its_question_and_media_match_placeholders(reviews):
    test = reviews.datasets["test"]
    special = TOKENIZER.special_ids
    cut = [i for i, d in enumerate(test.documents) if d.tokens > 512]
    assert cut, "the fixture should have documents longer than the context"
    for i in cut:
        sample, doc = test[i], test.documents[i]
        assert sample["truncated"] and len(sample["input_ids"]) <= 512
        question = list(doc.question)  # survives whole, right before the prompt's end
        end = sample["prompt_len"] - ASSISTANT_HEADER  # <|eot_id|> + the assistant's header
        assert sample["input_ids"][end - len(question) : end] == question
        assert sample["input_ids"].count(special["<|image|>"]) == len(sample["images"])
        runs = sum(
            1
            for k, t in enumerate(sample["input_ids"])
            if t == special["<|speech|>"] and (k == 0 or sample["input_ids"][k - 1] != t)
        )
        assert runs == len(sample["audio"])
    metrics = reviews.truncation_metrics()
    expected = sum(d.tokens > 512 for d in test.documents) / len(test.documents)
    assert metrics["data/truncated_fraction"] == pytest.approx(expected)
    lost = sum(test[i]["evidence_lost"] for i in range(len(test)))
    assert metrics["data/evidence_lost_fraction"] == pytest.approx(lost / len(test))
    # what the fusion system is told of this data: one typed object
    facts = reviews.facts()
    assert facts.truncation == metrics
    assert facts.evidence_far_tokens == reviews.evidence_far_tokens > 0
    assert facts.answer_tokens_per_batch == reviews.answer_tokens_per_batch > 0
    assert set(facts.task_metric) == set(reviews.task_metric)


def test_bad_review_settings_name_the_setting():
    with pytest.raises(ConfigError, match="data.truncation='middle'"):
        ReviewDataModule(truncation="middle")
    with pytest.raises(ConfigError, match="data.weights names unknown tasks"):
        ReviewDataModule(weights={"figures": 1.0})
    with pytest.raises(ConfigError, match="data.context_stages"):
        ReviewDataModule(max_tokens=512, context_stages=[[0, 256], [10, 1024]])


TINY_REVIEWS = [
    "experiment=fusion_reviews",
    "model.language.llama.flavor=tiny",
    "++model.vision.encoder={patch_size: 8, feature_layers: [0],"
    " backbone_kwargs: {embed_dim: 32, depth: 2, num_heads: 2}}",
    "++model.speech.encoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64, dropout: 0.0}",
    "model.speech.adapter={dim: 32, n_heads: 2, ffn_dim: 64}",
    "model.max_new_tokens=6",
    "data.doc_tokens=[600,1500]",
    "data.recording_seconds=[3.0,6.0]",
    "data.train_docs=24",
    "data.val_per_task=1",
    "data.test_per_task=2",
    "data.batch_size=2",
    "data.tokens_per_batch=null",
    "data.weights={figure: 1.0, transcribe: 1.0, translate: 1.0, passkey: 1.0}",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
]


@pytest.mark.slow
@pytest.mark.parametrize("context", ["512t", "2k"])
def test_a_short_fusion_run_on_review_documents_writes_metrics_and_cuts(tmp_path, context):
    from herd.train import train

    overrides = [*TINY_REVIEWS, f"context={context}"]
    if context == "2k":  # staged growth: 1024 tokens, then the full 2048
        overrides.append("data.context_stages=[[0,1024],[2,2048]]")
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    for name in ("top1", "wer", "bleu", "passkey_acc", "loss"):
        assert f"test/{name}" in saved, name
    assert any(k.endswith(("_near", "_far")) for k in saved)
    predictions = [json.loads(x) for x in (run / "test_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * len(REVIEW_TASKS)
    assert all("evidence_distance" in p for p in predictions)
    lost = sum(p["evidence_lost"] for p in predictions) / len(predictions)
    assert saved["data/evidence_lost_fraction"] == pytest.approx(lost)
    if context == "512t":  # every document is longer than 512 tokens
        assert saved["data/truncated_fraction"] == 1
        assert saved["data/evidence_lost_fraction"] > 0
    else:  # every document fits 2048 tokens: nothing is cut
        assert saved["data/truncated_fraction"] == 0
        assert saved["data/evidence_lost_fraction"] == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_tokens_per_batch_gives_two_contexts_the_same_tokens_per_step():
    sizes = {}
    for max_tokens in (512, 2048):
        data = small_reviews(
            max_tokens=max_tokens, train_docs=60, test_per_task=1, tokens_per_batch=4096
        )
        lengths = [min(d.tokens, max_tokens) for d in data.datasets["train"].documents]
        assert data.train_batch_size == round(4096 * len(lengths) / sum(lengths))
        tokens = data.truncation_metrics()["data/train_tokens_per_batch"]
        assert tokens == pytest.approx(4096, rel=0.15)
        sizes[max_tokens] = data.train_batch_size
    assert sizes[512] > sizes[2048]  # more, shorter documents per batch at the short context
