"""Long review documents from the digits world: the tasks on which context length matters.

A document interleaves, in random order, prose paragraphs (the embedded English corpus),
figures (handwritten digits, "figure k: <|image|>"), recorded remarks (spoken clips
concatenated into recordings, "recording r: <|speech|>") and English passages of number
sentences ("passage p: ..."), and may hold a pass key. It ends with one question whose
evidence can sit anywhere in it:

    figure     "which digit does figure k show?"        -> the digit word   (top1)
    transcribe "transcribe recording r."                 -> its transcript   (wer)
    translate  "translate passage p into german."        -> the German       (bleu)
    passkey    "what is the pass key?"                   -> "The pass key is <key>."  (passkey_acc)

Every answer records `evidence_distance`: the tokens from the start of the segment holding
its evidence to the end of the prompt. Documents are drawn with lengths log-uniform in
`doc_tokens`, deterministically from (split_seed, split, index); test documents never
change with the training seed.

A document longer than the context is cut by a named policy (`truncation`):
    drop_front  keep the question, drop whole segments from the front (a text segment may
                lose its first tokens; an image or a recording goes whole), the default;
    error       stop, naming the document.
The fraction of documents cut and of answers whose evidence was cut are counted
(`data/truncated_fraction`, `data/evidence_lost_fraction` for the test split), never
silently. The context of the cut follows the run's staged growth (`context_stages`).
"""

from __future__ import annotations

import logging
import math
import random
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from herd.data.audio import SAMPLE_RATE
from herd.data.chat import chat_ids, prompt_ids
from herd.data.chat_module import ChatDataModule
from herd.data.corpus import pydoc_documents, split_documents
from herd.data.digits_tasks import speech_examples
from herd.data.images import DIGITS_SPLIT_SEED, digits_images, digits_split
from herd.data.numbers import PASSAGE, PASSAGE_QUESTION, number_to_english, phrases_of_split
from herd.data.passkey import CHAT_ANSWER, NEEDLE
from herd.data.sampling import length_bucket_train_batches
from herd.data.speech import DIGITS_MANIFEST
from herd.data.tokenizer import IMAGE, SPEECH, Tokenizer
from herd.errors import ConfigError, DataError
from herd.utils.config import plain

log = logging.getLogger(__name__)

REVIEW_TASKS = ("figure", "transcribe", "translate", "passkey")
REVIEW_TASK_METRIC = {
    "figure": "top1",
    "transcribe": "wer",
    "translate": "bleu",
    "passkey": "passkey_acc",
}
TRUNCATION_POLICIES = ("drop_front", "error")
# the task that asks about each kind of item
TASK_OF_ITEM = {
    "figure": "figure",
    "recording": "transcribe",
    "passage": "translate",
    "passkey": "passkey",
    "prose": None,
}
GAP_SECONDS = 0.3  # silence between the remarks of one recording


# ----------------------------------------------------------------------------- documents


@dataclass
class Segment:
    """One piece of a document: text with at most one media marker, and its token ids."""

    kind: str  # prose | figure | recording | passage | passkey
    ids: array  # token ids (int32), placeholders included
    item: int | None = None  # the digit image's or passage's index, or the pass key
    clips: tuple[int, ...] = ()  # indices into the split's spoken clips (one recording)


@dataclass
class ReviewDocument:
    task: str
    segments: list[Segment]
    question: array  # token ids of the question
    answer: str
    evidence: int  # index of the segment holding the evidence
    followups: list[tuple[array, str]] = field(
        default_factory=list
    )  # more (question, answer) turns
    tokens: int = 0  # of the whole chat-encoded sample, before any cut
    evidence_distance: int = 0  # tokens from the evidence segment to the prompt's end


@dataclass
class Sources:
    """The raw material of one split."""

    paragraphs: list[str]
    images: torch.Tensor  # [n, C, H, W] in [-1, 1]
    labels: list[int]
    clips: list[torch.Tensor]  # [S] each
    transcripts: list[str]
    passages: list[tuple[str, str]]  # (English, German)

    def recording(self, clips: tuple[int, ...]) -> torch.Tensor:
        """The clips played one after another with short silences between: [S]."""
        gap = torch.zeros(int(GAP_SECONDS * SAMPLE_RATE))
        parts = []
        for k, c in enumerate(clips):
            parts += [gap] * (k > 0) + [self.clips[c]]
        return torch.cat(parts)

    def recording_samples(self, clips: tuple[int, ...]) -> int:
        """recording(clips).shape[0], without building it."""
        gap = int(GAP_SECONDS * SAMPLE_RATE)
        return sum(self.clips[c].shape[-1] for c in clips) + gap * (len(clips) - 1)


def load_sources(
    split: str,
    image_size: int,
    channels: int,
    split_seed: int,
    speech_manifest: Path | None,
    passages: int,
    with_speech: bool,
) -> Sources:
    prose = split_documents(pydoc_documents())[split]
    paragraphs = [p for doc in prose for p in doc.split("\n\n") if len(p.split()) >= 20]
    images, labels, _ = digits_images(image_size, channels)
    index = digits_split(labels, split, split_seed)
    spoken = (
        speech_examples(speech_manifest or DIGITS_MANIFEST, split, ("asr",)) if with_speech else []
    )
    phrases = [(p.english, p.german) for p in phrases_of_split(passages, split_seed, split)]
    return Sources(
        paragraphs=paragraphs,
        images=torch.stack([images[i] / 127.5 - 1.0 for i in index]),
        labels=[labels[i] for i in index],
        clips=[ex.audio[0] for ex in spoken],
        transcripts=[ex.answer for ex in spoken],
        passages=phrases,
    )


class DocumentMaker:
    """Draws review documents of one split. `speech_tokens` (None: no speech) counts the
    placeholders of a recording; `weights` mixes the question tasks."""

    def __init__(
        self,
        sources: Sources,
        tokenizer: Tokenizer,
        speech_tokens,
        doc_tokens: tuple[int, int],
        recording_seconds: tuple[float, float],
        weights: dict[str, float],
        max_items: int = 3,
    ):
        self.sources, self.tokenizer, self.speech_tokens = sources, tokenizer, speech_tokens
        self.doc_tokens, self.recording_seconds = doc_tokens, recording_seconds
        self.weights = {t: w for t, w in weights.items() if w > 0}
        self.max_items = max_items
        # the chat frame around the document: <bos> user header | document | <eot> assistant
        # header; `user_start` tokens come before the document, `frame` in all
        self.user_start = chat_ids([-1], "", tokenizer)["input_ids"].index(-1)
        self.frame = chat_ids([], "", tokenizer)["prompt_len"]

    def _ids(self, text: str, clip_samples: tuple[int, ...] = ()) -> array:
        return array("i", prompt_ids(text, self.tokenizer, clip_samples, self.speech_tokens))

    def _recording(self, rng: random.Random) -> tuple[int, ...]:
        lo, hi = self.recording_seconds
        target = rng.uniform(lo, hi) * SAMPLE_RATE
        clips: list[int] = []
        while not clips or self.sources.recording_samples(tuple(clips)) < target:
            clips.append(rng.randrange(len(self.sources.clips)))
        return tuple(clips)

    def _question(self, items: list[Segment], seg: Segment) -> tuple[str, str]:
        """The question about item `seg` of a document's `items`, and its answer."""
        src = self.sources
        number = sum(s.kind == seg.kind for s in items[: items.index(seg) + 1])
        if seg.kind == "figure":
            return f"which digit does figure {number} show?", number_to_english(
                src.labels[seg.item]
            )
        if seg.kind == "recording":
            return f"transcribe recording {number}.", " ".join(
                src.transcripts[c] for c in seg.clips
            )
        if seg.kind == "passage":
            return PASSAGE_QUESTION.format(number=number), src.passages[seg.item][1]
        return "what is the pass key?", CHAT_ANSWER.format(key=seg.item)

    def make(
        self, rng: random.Random, task: str | None = None, all_questions: bool = False
    ) -> ReviewDocument:
        """One document; its question's task drawn by `weights` unless given. With
        `all_questions`, further turns ask about every other item of a trained task."""
        src = self.sources
        if task is None:
            tasks = list(self.weights)
            task = rng.choices(tasks, [self.weights[t] for t in tasks])[0]
        lo, hi = self.doc_tokens
        target = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

        # the items: a few of each kind the data has, so that a question must pick its own
        items: list[Segment] = []
        n_fig = rng.randint(1, self.max_items)
        for _ in range(n_fig):
            i = rng.randrange(len(src.labels))
            items.append(Segment("figure", array("i"), item=i))
        if src.clips:
            for _ in range(rng.randint(1, max(1, self.max_items - 1))):
                items.append(Segment("recording", array("i"), clips=self._recording(rng)))
        for _ in range(rng.randint(1, self.max_items)):
            items.append(Segment("passage", array("i"), item=rng.randrange(len(src.passages))))
        if task == "passkey" or rng.random() < 0.5:
            items.append(Segment("passkey", array("i"), item=rng.randrange(10_000, 100_000)))
        rng.shuffle(items)

        # numbering in document order, and each item's text
        counters: dict[str, int] = {}
        for seg in items:
            counters[seg.kind] = number = counters.get(seg.kind, 0) + 1
            if seg.kind == "figure":
                seg.ids = self._ids(f"figure {number}: {IMAGE} a handwritten digit.\n")
            elif seg.kind == "recording":
                samples = src.recording_samples(seg.clips)
                seg.ids = self._ids(f"recording {number}: {SPEECH}\n", (samples,))
            elif seg.kind == "passage":
                text = PASSAGE.format(number=number, text=src.passages[seg.item][0])
                seg.ids = self._ids(text + "\n")
            else:
                seg.ids = self._ids(NEEDLE.format(key=seg.item) + "\n")

        # the question: about one item of its task's kind, drawn uniformly
        candidates = [k for k, seg in enumerate(items) if TASK_OF_ITEM[seg.kind] == task]
        seg = items[rng.choice(candidates)]
        question, answer = self._question(items, seg)
        question_ids = self._ids("\n" + question)
        answer_len = len(self.tokenizer.encode(answer)) + 1
        # training documents may go on asking, one turn each, about every other item whose
        # task is trained: more answers per document read for the same tokens
        followups: list[tuple[array, str]] = []
        if all_questions:
            others = [s for s in items if s is not seg and TASK_OF_ITEM[s.kind] in self.weights]
            for other in rng.sample(others, len(others)):
                q, a = self._question(items, other)
                followups.append((self._ids(q), a))
        turn = self.frame - 1  # a further turn's frame: the chat's less its <bos>
        more = sum(turn + len(q) + len(self.tokenizer.encode(a)) + 1 for q, a in followups)

        # prose around the items up to the target length
        used = self.frame + len(question_ids) + answer_len + more
        used += sum(len(s.ids) for s in items)
        prose: list[Segment] = []
        while used < target:
            text = rng.choice(src.paragraphs)
            ids = self._ids(text.strip() + "\n")
            if used + len(ids) > target and prose:
                ids = ids[: target - used]
            prose.append(Segment("prose", ids))
            used += len(ids)
        segments = list(prose)
        for item in items:  # each item at a random place among the paragraphs, in order
            segments.insert(rng.randint(0, len(segments)), item)
        evidence = next(k for k, s in enumerate(segments) if s is seg)
        doc = ReviewDocument(task, segments, question_ids, answer, evidence, followups)
        before = self.user_start + sum(len(s.ids) for s in segments[:evidence])
        prompt_len = self.frame + sum(len(s.ids) for s in segments) + len(question_ids)
        doc.tokens = prompt_len + answer_len + more
        doc.evidence_distance = prompt_len - before
        return doc


def truncate(doc: ReviewDocument, max_tokens: int, policy: str) -> tuple[int, int, bool]:
    """Where `drop_front` cuts a document to fit `max_tokens` in all:
    (first kept segment, tokens cut from its front, whether the evidence was cut). Nothing
    is cut when it fits (0, 0, False)."""
    excess = doc.tokens - max_tokens
    if excess <= 0:
        return 0, 0, False
    if policy == "error":
        raise DataError(
            f"A {doc.task} review document of {doc.tokens} tokens is longer than the context "
            f"of {max_tokens}; pick a longer context= or data.truncation=drop_front."
        )
    first = cut = 0
    while excess > 0:
        if first == len(doc.segments):
            raise DataError(
                f"A {doc.task} review document's question and answer alone do not fit a "
                f"context of {max_tokens} tokens; pick a longer context=."
            )
        seg = doc.segments[first]
        if seg.kind == "prose" and len(seg.ids) > excess:  # text may lose its first tokens
            cut, excess = excess, 0
        else:  # media and items go whole
            excess -= len(seg.ids)
            first += 1
    lost = doc.evidence < first or (doc.evidence == first and cut > 0)
    return first, cut, lost


class ReviewDataset(Dataset):
    """Review documents, encoded on access at the context a key asks for: `dataset[i]` at
    `max_tokens`, or `dataset[(i, n)]` at n tokens (staged context growth)."""

    def __init__(
        self,
        documents: list[ReviewDocument],
        sources: Sources,
        tokenizer: Tokenizer,
        max_tokens: int,
        policy: str,
    ):
        self.documents, self.sources, self.tokenizer = documents, sources, tokenizer
        self.max_tokens, self.policy = max_tokens, policy

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, key) -> dict:
        i, max_tokens = key if isinstance(key, tuple) else (key, self.max_tokens)
        doc = self.documents[i]
        first, cut, lost = truncate(doc, max_tokens, self.policy)
        kept = doc.segments[first:]
        user: list[int] = []
        images, audio = [], []
        for k, seg in enumerate(kept):
            user += list(seg.ids[cut:] if k == 0 else seg.ids)
            if seg.kind == "figure":
                images.append(self.sources.images[seg.item])
            elif seg.kind == "recording":
                audio.append(self.sources.recording(seg.clips))
        user += list(doc.question)
        encoded = chat_ids(user, doc.answer, self.tokenizer, doc.followups)
        return {
            **encoded,
            "task": doc.task,
            "answer": doc.answer,
            "images": images,
            "audio": audio,
            "evidence_distance": doc.evidence_distance,
            "evidence_lost": lost,
            "truncated": first > 0 or cut > 0,
        }


class StagedContextBatches(Sampler):
    """Batches of (index, context) keys: a batch sampler's batches, each at the context its
    training step has reached in `stages` ([[first_step, tokens], ...])."""

    def __init__(self, batches, stages: list[tuple[int, int]], start: int, world_size: int):
        self.batches, self.stages = batches, stages
        self.start, self.world_size = start, world_size

    def __iter__(self):
        for n, batch in enumerate(self.batches):
            step = self.start // self.world_size + n
            tokens = [t for first, t in self.stages if first <= step][-1]
            yield [(i, tokens) for i in batch]


class ReviewDataModule(ChatDataModule):
    """Review documents for the fusion stage (`experiment=fusion_reviews`).

    Args:
        doc_tokens: [low, high] document length in tokens, drawn log-uniformly.
        max_tokens: the context the documents are cut to (from `context=`).
        truncation: drop_front | error (see the module docstring).
        context_stages: [[first_step, tokens], ...] staged context growth in training.
        weights: question tasks mixed for training (0 drops one everywhere).
        recording_seconds: [low, high] length of a recording.
        max_items: figures, recordings and passages per document, each drawn from 1 to this
            (recordings up to one fewer), so that a question must name its item.
        tokens_per_batch: when set, the training batch size is chosen so that a batch holds
            this many tokens on average at this context (documents cut to it): runs at two
            contexts then train on the same number of tokens (`data/train_batch_size`).
        train_questions: one (a training document asks one question, as a test document
            does) | all (it goes on asking, a turn each, about every item of a trained task).
        evidence_far_tokens: metrics are also logged apart for answers whose evidence lies
            further back than this (`test/{metric}_far`) and within it (`_near`).
    """

    task_metric = REVIEW_TASK_METRIC

    def __init__(
        self,
        doc_tokens: list[int] | None = None,
        max_tokens: int = 2048,
        truncation: str = "drop_front",
        context_stages: list | None = None,
        weights: dict | None = None,
        train_docs: int = 4000,
        val_per_task: int = 8,
        test_per_task: int = 50,
        batch_size: int = 8,
        tokens_per_batch: int | None = None,
        recording_seconds: list[float] | None = None,
        max_items: int = 3,
        train_questions: str = "one",
        passages: int = 6000,
        evidence_far_tokens: int | None = 448,
        speech_manifest: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
        split_seed: int = DIGITS_SPLIT_SEED,
    ):
        super().__init__()
        doc_tokens = [int(n) for n in plain(doc_tokens) or [300, 4000]]
        recording_seconds = [float(s) for s in plain(recording_seconds) or [10.0, 60.0]]
        context_stages = [tuple(map(int, s)) for s in plain(context_stages) or []]
        self.save_hyperparameters()
        self.hparams.doc_tokens, self.hparams.recording_seconds = doc_tokens, recording_seconds
        self.hparams.context_stages = [list(s) for s in context_stages]
        self.hparams.weights = {
            str(k): float(v)
            for k, v in (plain(weights) or dict.fromkeys(REVIEW_TASKS, 1.0)).items()
        }
        unknown = set(self.hparams.weights) - set(REVIEW_TASKS)
        if unknown:
            raise ConfigError(
                f"data.weights names unknown tasks {sorted(unknown)}; review tasks are "
                f"{list(REVIEW_TASKS)}."
            )
        if train_questions not in ("one", "all"):
            raise ConfigError(
                f"data.train_questions={train_questions!r} is not one of ['one', 'all']."
            )
        if truncation not in TRUNCATION_POLICIES:
            raise ConfigError(
                f"data.truncation={truncation!r} is not one of {list(TRUNCATION_POLICIES)}."
            )
        if not (len(doc_tokens) == 2 and 0 < doc_tokens[0] <= doc_tokens[1]):
            raise ConfigError(
                f"data.doc_tokens={doc_tokens} must be [low, high] with 0 < low <= high."
            )
        if context_stages and (
            context_stages[0][0] != 0 or any(n > max_tokens for _, n in context_stages)
        ):
            raise ConfigError(
                f"data.context_stages={self.hparams.context_stages} must start at step 0 and "
                f"stay within the context of {max_tokens} tokens."
            )
        self.evidence_far_tokens = evidence_far_tokens
        self.train_batch_size = batch_size

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in REVIEW_TASKS if self.hparams.weights.get(t, 0) > 0)

    def seq_len_at(self, step: int) -> int:
        stages = self.hparams.context_stages
        return (
            [n for first, n in stages if first <= step][-1] if stages else self.hparams.max_tokens
        )

    def build_datasets(self) -> None:
        hp = self.hparams
        if "transcribe" in self.tasks and self.speech_tokens is None:
            raise ConfigError(
                "The transcribe task needs a speech encoder; set data.weights.transcribe=0 "
                "or give the model one."
            )
        manifest = Path(hp.speech_manifest) if hp.speech_manifest else None
        for split in ("train", "val", "test"):
            sources = load_sources(
                split,
                self.spec.image_size,
                self.spec.channels,
                hp.split_seed,
                manifest,
                hp.passages,
                self.speech_tokens is not None,
            )
            maker = DocumentMaker(
                sources,
                self.tokenizer,
                self.speech_tokens,
                tuple(hp.doc_tokens),
                tuple(hp.recording_seconds),
                hp.weights,
                hp.max_items,
            )
            documents = self._documents(maker, split)
            self.datasets[split] = ReviewDataset(
                documents, sources, self.tokenizer, hp.max_tokens, hp.truncation
            )
        train = self.datasets["train"].documents
        self.train_tokens = [min(d.tokens, hp.max_tokens) for d in train]  # once cut
        if hp.tokens_per_batch:
            mean = sum(self.train_tokens) / max(1, len(train))
            self.train_batch_size = max(1, round(hp.tokens_per_batch / mean))
        answers = sum(
            len(self.tokenizer.encode(a)) + 1
            for d in train
            for a in [d.answer, *(a for _, a in d.followups)]
        )
        self.answer_tokens_per_batch = self.train_batch_size * answers / max(1, len(train))
        log.info("Review documents: %s", self.truncation_metrics())

    def _documents(self, maker: DocumentMaker, split: str) -> list[ReviewDocument]:
        """Train: `train_docs` documents, first tasks mixed by weight, drawn from the training seed;
        val/test: `*_per_task` per task from the split seed only (fixed across runs)."""
        hp = self.hparams
        base = hp.seed if split == "train" else hp.split_seed
        salt = zlib.crc32(split.encode())
        if split == "train":
            every = hp.train_questions == "all"
            return [
                maker.make(random.Random(base * 1_000_003 + salt + i), all_questions=every)
                for i in range(hp.train_docs)
            ]
        per_task = hp.val_per_task if split == "val" else hp.test_per_task
        out: list[ReviewDocument] = []
        for task in self.tasks:
            salt = zlib.crc32(f"{split}/{task}".encode())
            out += [
                maker.make(random.Random(base * 1_000_003 + salt + i), task)
                for i in range(per_task)
            ]
        return out

    def truncation_metrics(self) -> dict[str, float]:
        """data/truncated_fraction and data/evidence_lost_fraction of the test documents
        at the run's context (data/train_truncated_fraction for training)."""
        out = {}
        for split, prefix in (("test", "data/"), ("train", "data/train_")):
            ds = self.datasets[split]
            cuts = [truncate(d, ds.max_tokens, ds.policy) for d in ds.documents]
            n = max(1, len(cuts))
            out[f"{prefix}truncated_fraction"] = sum(f > 0 or c > 0 for f, c, _ in cuts) / n
            out[f"{prefix}evidence_lost_fraction"] = sum(lost for *_, lost in cuts) / n
        out["data/train_batch_size"] = float(self.train_batch_size)
        mean = sum(self.train_tokens) / max(1, len(self.train_tokens))
        out["data/train_tokens_per_batch"] = self.train_batch_size * mean
        return out

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        batches = length_bucket_train_batches(
            self, self.train_tokens, self.train_batch_size, bucket_width=128
        )
        sampler = batches
        if hp.context_stages:
            sampler = StagedContextBatches(
                batches, [tuple(s) for s in hp.context_stages], batches.start, batches.world_size
            )
        return self.loader("train", batch_sampler=sampler)

    def reference_metrics(self) -> dict[str, float]:
        """The truncation counts and trivial baselines on the test documents: the most
        common training answer (figure, passkey) and an empty transcript (WER 1)."""
        from collections import Counter

        self.setup("fit")
        out = self.truncation_metrics()
        train, test = self.datasets["train"].documents, self.datasets["test"].documents
        for task, key in (
            ("figure", "test/top1_majority"),
            ("passkey", "test/passkey_acc_majority"),
        ):
            answers = [d.answer for d in test if d.task == task]
            if task in self.tasks and answers:
                common = Counter(d.answer for d in train if d.task == task).most_common(1)
                out[key] = sum(a == common[0][0] for a in answers) / len(answers) if common else 0.0
        if "transcribe" in self.tasks:
            out["test/wer_empty"] = 1.0
        return out


__all__ = [
    "REVIEW_TASKS",
    "REVIEW_TASK_METRIC",
    "DocumentMaker",
    "ReviewDataModule",
    "ReviewDataset",
    "ReviewDocument",
    "Segment",
    "truncate",
]
