"""Interleaved image / speech / text samples for the fusion stage, in the Llama 3 chat
format (herd.data.chat): the digits world's five tasks (herd.data.digits_tasks) mixed for
training, or a user's chat manifest (herd.data.chat_manifest)."""

from __future__ import annotations

import logging
import random
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from herd.data.audio import augment_clip
from herd.data.base import check_source
from herd.data.chat import IGNORE_INDEX, Example, encode_example
from herd.data.chat_manifest import read_chat_manifests
from herd.data.chat_module import ChatDataModule
from herd.data.digits_tasks import (
    PASSKEY_FILLER_REPEATS,
    TASK_METRIC,
    TASKS,
    VIDEO_TASKS,
    image_examples,
    passkey_examples,
    says_a_word_twice,
    speech_examples,
    translation_examples,
    video_examples,
)
from herd.data.images import DIGITS_SPLIT_SEED
from herd.data.sampling import LengthBucketBatches, draw_key, length_bucket_train_batches
from herd.data.speech import DIGITS_MANIFEST
from herd.data.tokenizer import Tokenizer
from herd.errors import ConfigError, DataError
from herd.utils.config import plain
from herd.utils.rng import sample_rng

log = logging.getLogger(__name__)

# The tasks' samples run from 20 (image) to ~220 (passkey) tokens, and batches padded to
# their longest spent ~70% of the compute on padding. Coarse length buckets keep the short
# tasks mixed within a batch (fully sorted, nearly one-task batches learnt the sequence
# tasks more slowly per step) and the long passkey samples among themselves.
BUCKET_WIDTH = 96


class ExampleDataset(Dataset):
    """Examples of one or more tasks, encoded on access (images and audio stay tensors).
    With `speed_factors`, each access plays the audio at a factor drawn from them (before
    the placeholders are counted), as the speech stage does; with `silence_pad`, each clip
    then gets up to that many seconds of silence before and after it, drawn per access.
    The tasks in `train_on_prompt` are also trained on their prompts' text
    (herd.data.chat.chat_turns)."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: Tokenizer,
        speech_tokens=None,
        speed_factors: tuple[float, ...] = (),
        seed: int = 0,
        train_on_prompt: Collection[str] = (),
        silence_pad: float = 0.0,
    ):
        self.examples, self.tokenizer, self.speech_tokens = examples, tokenizer, speech_tokens
        self.speed_factors, self.seed = tuple(speed_factors), seed
        self.silence_pad = silence_pad
        self.train_on_prompt = frozenset(train_on_prompt)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        if ex.audio and (self.speed_factors or self.silence_pad):
            # drawn from (seed, the sample's place in the training stream): resumes exactly
            rng = sample_rng(self.seed, draw_key(i))
            audio = (augment_clip(a, rng, self.speed_factors, self.silence_pad) for a in ex.audio)
            ex = replace(ex, audio=tuple(audio))
        return {
            **encode_example(
                ex, self.tokenizer, self.speech_tokens, ex.task in self.train_on_prompt
            ),
            "task": ex.task,
            "answer": ex.answer,
            "images": list(ex.images),
            "audio": list(ex.audio),
            "videos": list(ex.videos),
            # the token ids of what each clip says (no transcripts: none)
            "speech_targets": [self.tokenizer.encode(t) for t in ex.transcripts],
        }


def mix_examples(
    by_task: dict[str, list[Example]], weights: dict[str, float], size: int, seed: int
) -> list[Example]:
    """`size` training examples drawn from the tasks in proportion to `weights` (tasks cycle
    through their own examples in a shuffled order, so small tasks repeat evenly)."""
    rng = random.Random(seed)
    active = {t: w for t, w in weights.items() if w > 0 and by_task.get(t)}
    total = sum(active.values())
    mixed: list[Example] = []
    for task, weight in active.items():
        pool = list(by_task[task])
        count = round(size * weight / total)
        while count > 0:
            rng.shuffle(pool)
            mixed += pool[:count]
            count -= len(pool[:count])
    rng.shuffle(mixed)
    return mixed


class FusionDataModule(ChatDataModule):
    """The five tasks of the digits world, mixed for training by `weights`; validation and
    test hold up to `val_per_task` / `test_per_task` examples of every task with weight > 0.
    Or, with `source=manifest`, a user's chat manifest(s) (herd.data.chat_manifest):
    `manifest` (training lines, and val/test lines by their `split` field),
    `val_manifest`, `test_manifest`, each sample as given; `max_tokens` bounds a sample and
    `skip_bad_samples` skips and counts bad lines instead of stopping.
    `speed_perturb` lists speed factors drawn per training clip ([] or null: none);
    `silence_pad` (seconds) bounds the silence drawn before and after each training clip.
    `passkey_filler_repeats` bounds the filler of training passkey prompts (shorter ones
    are more copying examples per token; validation and test keep the default).
    `video_train` is the number of training clips of the video tasks (each clip is asked
    once per weighted video task). `lead_in_weights` / `lead_in_steps`: a curriculum, the
    first `lead_in_steps` training batches are mixed by `weights` updated with
    `lead_in_weights` (e.g. {passkey: 1.0}: a larger pass-key share; every other task 0:
    one task alone), then the mixture follows. `train_on_prompt` lists tasks whose training
    examples are also trained on their prompts' text (e.g. a manifest's documents; for
    the passkey task it slowed learning, experiments/fusion_recipe). `loss_weights`
    multiplies a task's answer tokens in the training loss (tasks not named: 1), a larger
    say for a task without spending steps on it. `repeated_word_copies` puts each training
    clip whose transcript says a word twice in a row (e.g. "four four") that many times in
    its speech tasks' pools, so the mixture draws them more often (1: as recorded)."""

    def __init__(
        self,
        weights: dict | None = None,
        train_size: int = 20_000,
        val_per_task: int = 32,
        test_per_task: int = 200,
        batch_size: int = 16,
        translation_phrases: int = 6000,
        passkey_train: int = 4000,
        passkey_filler_repeats: int = PASSKEY_FILLER_REPEATS,
        video_train: int = 2000,
        speech_manifest: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
        split_seed: int = DIGITS_SPLIT_SEED,
        speed_perturb: list[float] | None = None,
        silence_pad: float = 0.0,
        source: str = "digits",
        manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        skip_bad_samples: bool = False,
        max_tokens: int = 2048,
        lead_in_weights: dict | None = None,
        lead_in_steps: int = 0,
        train_on_prompt: list[str] | None = None,
        loss_weights: dict | None = None,
        repeated_word_copies: int = 1,
    ):
        super().__init__()
        speed_perturb = [float(f) for f in plain(speed_perturb) or []]
        train_on_prompt = [str(t) for t in plain(train_on_prompt) or []]
        loss_weights = {str(k): float(v) for k, v in (plain(loss_weights) or {}).items()}
        lead_in_weights = {str(k): float(v) for k, v in (plain(lead_in_weights) or {}).items()}
        self.save_hyperparameters()
        if silence_pad < 0:
            raise ConfigError(f"data.silence_pad must be >= 0 seconds, got {silence_pad}.")
        if repeated_word_copies < 1:
            raise ConfigError(
                f"data.repeated_word_copies must be >= 1 (1: each clip once), got "
                f"{repeated_word_copies}."
            )
        negative = {t: w for t, w in loss_weights.items() if w < 0}
        if negative:
            raise ConfigError(f"data.loss_weights {negative} must be >= 0.")
        check_source(source, ("digits", "manifest"), manifest, path_kind="a JSONL chat manifest")
        self.hparams.weights = {
            str(k): float(v) for k, v in (weights or dict.fromkeys(TASKS, 1.0)).items()
        }
        unknown = set(self.hparams.weights) - set(TASKS + VIDEO_TASKS)
        if unknown:
            raise ConfigError(
                f"data.weights names unknown tasks {sorted(unknown)}; tasks are "
                f"{list(TASKS + VIDEO_TASKS)}."
            )
        self.train_lengths: list[int] = []
        self.lead_in: list[list[int]] = []  # the first training batches (dataset indices)

    @property
    def tasks(self) -> tuple[str, ...]:
        if self.hparams.source == "manifest":
            return tuple(self.task_metric)
        return tuple(t for t in TASKS + VIDEO_TASKS if self.hparams.weights.get(t, 0) > 0)

    def build_datasets(self) -> None:
        hp = self.hparams
        if hp.source == "manifest":
            by_split = self._manifest_examples()
        else:
            by_split = {split: self._examples(split) for split in ("train", "val", "test")}
        trained = sorted(t for t, exs in by_split["train"].items() if exs)
        for setting in ("train_on_prompt", "loss_weights", "lead_in_weights"):
            if set(hp[setting]) - set(trained):
                raise ConfigError(
                    f"data.{setting}={hp[setting]} must name training tasks (here {trained})."
                )
        self.task_loss_weight = dict(hp.loss_weights)
        rng = random.Random(hp.seed)
        for split, by_task in by_split.items():
            if hp.source == "manifest":  # the user's samples, as given
                examples = [ex for exs in by_task.values() for ex in exs]
            elif split == "train":
                examples = mix_examples(by_task, hp.weights, hp.train_size, hp.seed)
            else:
                cap = hp.val_per_task if split == "val" else hp.test_per_task
                examples = [
                    ex
                    for t in self.tasks
                    for ex in rng.sample(by_task[t], min(cap, len(by_task[t])))
                ]
            is_train = split == "train"
            self.datasets[split] = ExampleDataset(
                examples,
                self.tokenizer,
                self.speech_tokens,
                tuple(hp.speed_perturb) if is_train else (),
                hp.seed,
                hp.train_on_prompt if is_train else (),
                hp.silence_pad if is_train else 0.0,
            )
        train = self.datasets["train"]
        mixed = len(train.examples)
        if hp.lead_in_steps:  # appended after the mixture; the sampler serves them first
            self.lead_in = self._lead_in_batches(by_split["train"], trained)
        # the mixture's lengths at normal speed, no silence (the buckets only need them roughly)
        plain_train = ExampleDataset(
            train.examples[:mixed],
            self.tokenizer,
            self.speech_tokens,
            train_on_prompt=hp.train_on_prompt,
        )
        encoded = [plain_train[i] for i in range(mixed)]
        self.train_lengths = [len(e["input_ids"]) for e in encoded]
        # the training loss's fixed denominator (see FusionSystem.training_step)
        answer_tokens = sum(sum(y != IGNORE_INDEX for y in e["labels"]) for e in encoded)
        self.answer_tokens_per_batch = hp.batch_size * answer_tokens / max(1, len(encoded))
        log.info(
            "Fusion data: %s",
            ", ".join(f"{t}: {len(by_split['train'][t])} train" for t in self.tasks),
        )

    def _lead_in_batches(self, by_task: dict[str, list[Example]], trained: list[str]):
        """The curriculum's first batches: `lead_in_steps` batches drawn by `weights` updated
        with `lead_in_weights`, appended to the training set and bucketed by length like
        the mixture (so the long passkey prompts still batch together); dataset indices."""
        hp, train = self.hparams, self.datasets["train"]
        weights = {**hp.weights, **hp.lead_in_weights}
        if not any(w > 0 for t, w in weights.items() if t in trained):
            raise ConfigError(
                f"data.lead_in_weights={hp.lead_in_weights} leave no training task with "
                f"weight > 0 for the {hp.lead_in_steps} lead-in steps."
            )
        wanted = hp.lead_in_steps * hp.batch_size
        lead = mix_examples(by_task, weights, wanted, hp.seed + 1)[:wanted]
        encoded = ExampleDataset(lead, self.tokenizer, self.speech_tokens)
        lengths = [len(encoded[i]["input_ids"]) for i in range(len(lead))]
        first = len(train.examples)
        train.examples = train.examples + lead
        batches = LengthBucketBatches(lengths, hp.batch_size, hp.seed, bucket_width=BUCKET_WIDTH)
        return [[first + i for i in b] for b in batches.batches_of_pass(0)]

    def _manifest_examples(self) -> dict[str, dict[str, list[Example]]]:
        """{split: {task: examples}} from the chat manifests; the tasks' metrics become this
        data's `task_metric` ("{task}/{metric}", logged as test/{task}/{metric})."""
        hp = self.hparams
        files = {"train": hp.manifest, "val": hp.val_manifest, "test": hp.test_manifest}
        by_split, metrics = read_chat_manifests(
            files,
            self.tokenizer,
            self.speech_tokens,
            self.spec.image_size,
            self.spec.channels,
            hp.max_tokens,
            hp.skip_bad_samples,
            self.spec.max_video_frames,
        )
        self.task_metric = {t: f"{t}/{m}" for t, m in metrics.items() if m != "none"}
        self.task_metric.update({t: None for t, m in metrics.items() if m == "none"})
        return {
            split: {t: [ex for ex in examples if ex.task == t] for t in metrics}
            for split, examples in by_split.items()
        }

    def _examples(self, split: str) -> dict[str, list[Example]]:
        hp, tasks = self.hparams, self.tasks
        seed = hp.seed + {"train": 0, "val": 1, "test": 2}[split]  # generated tasks' draws
        out: dict[str, list[Example]] = {}
        if "image" in tasks:
            out["image"] = image_examples(
                split, self.spec.image_size, self.spec.channels, hp.split_seed
            )
        spoken = tuple(t for t in ("asr", "st") if t in tasks)
        if spoken:
            manifest = Path(hp.speech_manifest) if hp.speech_manifest else DIGITS_MANIFEST
            examples = speech_examples(manifest, split, spoken)
            copies = hp.repeated_word_copies if split == "train" else 1
            for t in spoken:
                out[t] = [
                    ex
                    for ex in examples
                    if ex.task == t
                    for _ in range(copies if says_a_word_twice(ex.transcripts[0]) else 1)
                ]
        if "mt" in tasks:
            out["mt"] = translation_examples(hp.translation_phrases, hp.seed, split)
        if "passkey" in tasks:
            n, repeats = max(hp.val_per_task, hp.test_per_task), PASSKEY_FILLER_REPEATS
            if split == "train":
                n, repeats = hp.passkey_train, hp.passkey_filler_repeats
            out["passkey"] = passkey_examples(n, seed, repeats)
        filmed = tuple(t for t in VIDEO_TASKS if t in tasks)
        if filmed:
            n = hp.video_train if split == "train" else max(hp.val_per_task, hp.test_per_task)
            out.update(
                video_examples(
                    n, split, seed, hp.split_seed, self.spec.image_size, self.spec.channels, filmed
                )
            )
        empty = [t for t in tasks if not out.get(t)]
        if empty:
            raise DataError(f"The {split} split has no examples for task(s) {empty}.")
        return out

    def train_dataloader(self) -> DataLoader:
        batches = length_bucket_train_batches(
            self,
            self.train_lengths,
            self.hparams.batch_size,
            bucket_width=BUCKET_WIDTH,
            lead_in=self.lead_in,
        )
        return self.loader("train", batch_sampler=batches)

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines on the test split: always answering the most common training
        answer of each task (exact-match tasks, and the video digit sequences' WER; a
        manifest's exact/top1 tasks) and an empty answer (WER 1)."""
        from collections import Counter

        from torchmetrics.functional.text import word_error_rate

        self.setup("fit")
        test = self.datasets["test"].examples
        train = self.datasets["train"].examples
        out = {}
        for task in self.tasks:
            common = Counter(ex.answer for ex in train if ex.task == task).most_common(1)
            answers = [ex.answer for ex in test if ex.task == task]
            hits = sum(a == common[0][0] for a in answers) / max(1, len(answers)) if common else 0.0
            if self.hparams.source == "manifest":  # "{task}/{metric}", or None: loss only
                name = self.task_metric[task]
                kind = name and name.rsplit("/", 1)[-1]
                if kind in ("exact", "top1"):
                    out[f"test/{name}_majority"] = hits
                elif kind == "wer":
                    out[f"test/{name}_empty"] = 1.0
                continue
            metric = TASK_METRIC[task]
            if metric.startswith("wer"):
                out[f"test/{metric}_empty"] = 1.0
                if task in VIDEO_TASKS:  # digit sequences: the most common one is a guess
                    guess = [common[0][0]] * len(answers)
                    out[f"test/{metric}_majority"] = float(word_error_rate(guess, answers))
            elif not metric.startswith("bleu"):  # exact match (BLEU's empty answer scores 0)
                out[f"test/{metric}_majority"] = hits
        return out


__all__ = ["ExampleDataset", "FusionDataModule", "mix_examples"]
