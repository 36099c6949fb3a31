"""Interleaved image / speech / text samples for the fusion stage, in the Llama 3 chat
format (herd.data.chat), from the digits world or a user's chat manifest
(herd.data.chat_manifest).

Tasks on the embedded "digits" world (all real data shipped with the repo or a package):
  image   handwritten digit -> its English word            (metric: top1, exact match)
  asr     spoken phrase -> English transcript               (metric: wer)
  st      spoken phrase -> German translation               (metric: bleu_st)
  mt      English number phrase -> German                   (metric: bleu_mt)
  passkey a five-digit key hidden in filler -> the key      (metric: passkey_acc)
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from herd.data.audio import SAMPLE_RATE, read_audio, speed_perturb
from herd.data.base import HerdDataModule, check_source
from herd.data.chat import IGNORE_INDEX, Example, collate, encode_example
from herd.data.chat_manifest import read_chat_manifests
from herd.data.images import DIGITS_SPLIT_SEED, digits_images, digits_split
from herd.data.numbers import TRANSLATE_PROMPT, number_to_english, phrases_of_split
from herd.data.passkey import NEEDLE, REPEATED_FILLER
from herd.data.sampling import draw_key, length_bucket_train_batches
from herd.data.speech import DIGITS_MANIFEST
from herd.data.tokenizer import IMAGE, SPEECH, Tokenizer
from herd.errors import ConfigError, DataError
from herd.utils.config import plain
from herd.utils.rng import sample_rng

log = logging.getLogger(__name__)

TASKS = ("image", "asr", "st", "mt", "passkey")
PASSKEY_FILLER_REPEATS = 4  # the validation and test prompts' (see passkey_examples)
# What each task's answer is scored with (see herd.systems.fusion).
TASK_METRIC = {
    "image": "top1",
    "asr": "wer",
    "st": "bleu_st",
    "mt": "bleu_mt",
    "passkey": "passkey_acc",
}
PROMPTS = {
    "image": f"{IMAGE}which digit is this?",
    "asr": f"{SPEECH}transcribe the audio.",
    "st": f"{SPEECH}translate the audio into german.",
    "mt": TRANSLATE_PROMPT,
    "passkey": "{text}what is the pass key?",
}


class ExampleDataset(Dataset):
    """Examples of one or more tasks, encoded on access (images and audio stay tensors).
    With `speed_factors`, each access plays the audio at a factor drawn from them (before
    the placeholders are counted), as the speech stage does."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer: Tokenizer,
        speech_tokens=None,
        speed_factors: tuple[float, ...] = (),
        seed: int = 0,
    ):
        self.examples, self.tokenizer, self.speech_tokens = examples, tokenizer, speech_tokens
        self.speed_factors, self.seed = tuple(speed_factors), seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        ex = self.examples[i]
        if ex.audio and self.speed_factors:
            # drawn from (seed, the sample's place in the training stream): resumes exactly
            rng = sample_rng(self.seed, draw_key(i))
            clips = tuple(speed_perturb(a, rng.choice(self.speed_factors)) for a in ex.audio)
            ex = replace(ex, audio=clips)
        return {
            **encode_example(ex, self.tokenizer, self.speech_tokens),
            "task": ex.task,
            "answer": ex.answer,
            "images": list(ex.images),
            "audio": list(ex.audio),
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


# ----------------------------------------------------------------------------- text tasks


def translation_examples(n: int, seed: int, split: str) -> list[Example]:
    """English -> German number phrases; the split is decided by the English text."""
    return [
        Example("mt", PROMPTS["mt"].format(text=p.english), p.german)
        for p in phrases_of_split(n, seed, split)
    ]


def passkey_examples(
    n: int, seed: int, max_filler_repeats: int = PASSKEY_FILLER_REPEATS
) -> list[Example]:
    """A five-digit key with 0 to `max_filler_repeats` - 1 copies of the filler sentences on
    each side."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        before, after = rng.randrange(max_filler_repeats), rng.randrange(max_filler_repeats)
        text = REPEATED_FILLER * before + NEEDLE.format(key=key) + REPEATED_FILLER * after
        out.append(Example("passkey", PROMPTS["passkey"].format(text=text), key))
    return out


def image_examples(split: str, image_size: int, channels: int, seed: int) -> list[Example]:
    """Handwritten digits -> their English word, on the vision stage's own split (same
    split_seed and fractions as data=digits), scaled to [-1, 1] as the image encoder was
    trained."""
    images, labels, _ = digits_images(image_size, channels)
    index = digits_split(labels, split, seed)
    return [
        Example(
            "image",
            PROMPTS["image"],
            number_to_english(labels[i]),
            images=(images[i] / 127.5 - 1.0,),
        )
        for i in index
    ]


def speech_examples(manifest: Path, split: str, tasks: tuple[str, ...]) -> list[Example]:
    """Spoken phrases of the corpus (split by voice) -> transcript (asr) and German (st)."""
    out = []
    for lineno, raw in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if entry.get("split") != split:
                continue
            audio = read_audio(manifest.parent / entry["audio"])
            answers = {"asr": entry["text"], "st": entry["german"]}
        except (ValueError, OSError, RuntimeError, KeyError) as exc:
            raise DataError(f"{manifest}, line {lineno}: {exc}.") from exc
        out += [Example(t, PROMPTS[t], answers[t], audio=(audio,)) for t in tasks]
    return out


@dataclass(frozen=True)
class ChatInputSpec:
    """What the fusion model being trained fixes about its inputs (FusionSystem.input_spec):
    prompts are encoded with its tokenizer, each clip gets `speech_tokens(num_samples)`
    placeholders (None: the model has no speech encoder) and its encoder reads audio at
    `sample_rate`, images are drawn at its image encoder's size and channels."""

    tokenizer: Tokenizer
    speech_tokens: Callable[[int], int] | None
    sample_rate: int | None
    image_size: int
    channels: int


@dataclass(frozen=True)
class ChatDataFacts:
    """What the chat data tells the fusion system once set up (ChatDataModule.facts()): the
    metric that scores each task (None: its loss alone), the evidence distance beyond which
    an answer also counts as `_far` (None: no near/far split), the mean answer tokens per
    training batch (the loss weight that makes every answer token count the same), and the
    truncation counts to log."""

    task_metric: Mapping[str, str | None] = field(default_factory=lambda: dict(TASK_METRIC))
    evidence_far_tokens: int | None = None
    answer_tokens_per_batch: float | None = None
    truncation: Mapping[str, float] = field(default_factory=dict)


class ChatDataModule(HerdDataModule):
    """What the fusion stage's data modules share: the input spec comes from the fusion model
    being trained (`trainer.lightning_module.input_spec()`), so prompts always match it;
    outside a trainer pass one to `setup_for(spec)`. Subclasses fill `self.datasets` in
    `build_datasets()`. `task_metric` maps each task to the metric that scores its answers."""

    task_metric: dict[str, str] = TASK_METRIC
    evidence_far_tokens: int | None = None  # review documents split their metrics near/far

    def __init__(self):
        super().__init__()
        self.spec: ChatInputSpec | None = None  # the model's, once set up
        self.answer_tokens_per_batch: float | None = None  # FusionSystem.training_step

    def setup_for(self, spec: ChatInputSpec) -> None:
        if spec.speech_tokens is not None and spec.sample_rate != SAMPLE_RATE:
            raise ConfigError(
                f"The speech encoder reads {spec.sample_rate} Hz audio, but the fusion stage's "
                f"data is read at {SAMPLE_RATE} Hz; train the speech stage at {SAMPLE_RATE} Hz."
            )
        self.spec = spec

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.spec.tokenizer if self.spec is not None else None

    @property
    def speech_tokens(self) -> Callable[[int], int] | None:
        return self.spec.speech_tokens if self.spec is not None else None

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.spec is None:
            system = self.trainer.lightning_module if self.trainer is not None else None
            if system is None:
                raise ConfigError(f"{type(self).__name__} needs setup_for(...) outside a trainer.")
            self.setup_for(system.input_spec())
        self.build_datasets()

    def build_datasets(self) -> None:
        raise NotImplementedError

    def collate_fn(self):
        return partial(collate, pad_id=self.tokenizer.pad_id)

    def truncation_metrics(self) -> dict[str, float]:
        """How much of the samples the context cuts (review documents say; others cut none)."""
        return {}

    def facts(self) -> ChatDataFacts:
        """What the fusion system needs to know of this data, after setup()."""
        return ChatDataFacts(
            dict(self.task_metric),
            self.evidence_far_tokens,
            self.answer_tokens_per_batch,
            self.truncation_metrics(),
        )


class FusionDataModule(ChatDataModule):
    """The five tasks of the digits world, mixed for training by `weights`; validation and
    test hold up to `val_per_task` / `test_per_task` examples of every task with weight > 0.
    Or, with `source=manifest`, a user's chat manifest(s) (herd.data.chat_manifest):
    `manifest` (training lines, and val/test lines by their `split` field),
    `val_manifest`, `test_manifest`, each sample as given; `max_tokens` bounds a sample and
    `skip_bad_samples` skips and counts bad lines instead of stopping.
    `speed_perturb` lists speed factors drawn per training clip ([] or null: none).
    `passkey_filler_repeats` bounds the filler of training passkey prompts (shorter ones
    are more copying examples per token; validation and test keep the default)."""

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
        speech_manifest: str | None = None,
        num_workers: int = 0,
        seed: int = 42,
        split_seed: int = DIGITS_SPLIT_SEED,
        speed_perturb: list[float] | None = None,
        source: str = "digits",
        manifest: str | None = None,
        val_manifest: str | None = None,
        test_manifest: str | None = None,
        skip_bad_samples: bool = False,
        max_tokens: int = 2048,
    ):
        super().__init__()
        speed_perturb = [float(f) for f in plain(speed_perturb) or []]
        self.save_hyperparameters()
        check_source(source, ("digits", "manifest"), manifest, path_kind="a JSONL chat manifest")
        self.hparams.weights = {
            str(k): float(v) for k, v in (weights or dict.fromkeys(TASKS, 1.0)).items()
        }
        unknown = set(self.hparams.weights) - set(TASKS)
        if unknown:
            raise ConfigError(
                f"data.weights names unknown tasks {sorted(unknown)}; tasks are {list(TASKS)}."
            )
        self.train_lengths: list[int] = []

    @property
    def tasks(self) -> tuple[str, ...]:
        if self.hparams.source == "manifest":
            return tuple(self.task_metric)
        return tuple(t for t in TASKS if self.hparams.weights.get(t, 0) > 0)

    def build_datasets(self) -> None:
        hp = self.hparams
        if hp.source == "manifest":
            by_split = self._manifest_examples()
        else:
            by_split = {split: self._examples(split) for split in ("train", "val", "test")}
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
            speed = tuple(hp.speed_perturb) if split == "train" else ()
            self.datasets[split] = ExampleDataset(
                examples, self.tokenizer, self.speech_tokens, speed, hp.seed
            )
        # lengths at normal speed: the buckets only need them roughly
        train = self.datasets["train"]
        plain_train = ExampleDataset(train.examples, self.tokenizer, self.speech_tokens)
        encoded = [plain_train[i] for i in range(len(train))]
        self.train_lengths = [len(e["input_ids"]) for e in encoded]
        # the training loss's fixed denominator (see FusionSystem.training_step)
        answer_tokens = sum(sum(y != IGNORE_INDEX for y in e["labels"]) for e in encoded)
        self.answer_tokens_per_batch = hp.batch_size * answer_tokens / max(1, len(encoded))
        log.info(
            "Fusion data: %s",
            ", ".join(f"{t}: {len(by_split['train'][t])} train" for t in self.tasks),
        )

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
        )
        self.task_metric = {t: f"{t}/{m}" for t, m in metrics.items() if m != "none"}
        self.task_metric.update({t: None for t, m in metrics.items() if m == "none"})
        return {
            split: {t: [ex for ex in examples if ex.task == t] for t in metrics}
            for split, examples in by_split.items()
        }

    def _examples(self, split: str) -> dict[str, list[Example]]:
        hp, tasks = self.hparams, self.tasks
        out: dict[str, list[Example]] = {}
        if "image" in tasks:
            out["image"] = image_examples(
                split, self.spec.image_size, self.spec.channels, hp.split_seed
            )
        spoken = tuple(t for t in ("asr", "st") if t in tasks)
        if spoken:
            manifest = Path(hp.speech_manifest) if hp.speech_manifest else DIGITS_MANIFEST
            examples = speech_examples(manifest, split, spoken)
            for t in spoken:
                out[t] = [ex for ex in examples if ex.task == t]
        if "mt" in tasks:
            out["mt"] = translation_examples(hp.translation_phrases, hp.seed, split)
        if "passkey" in tasks:
            n, repeats = max(hp.val_per_task, hp.test_per_task), PASSKEY_FILLER_REPEATS
            if split == "train":
                n, repeats = hp.passkey_train, hp.passkey_filler_repeats
            seed = hp.seed + {"train": 0, "val": 1, "test": 2}[split]
            out["passkey"] = passkey_examples(n, seed, repeats)
        empty = [t for t in tasks if not out.get(t)]
        if empty:
            raise DataError(f"The {split} split has no examples for task(s) {empty}.")
        return out

    def train_dataloader(self) -> DataLoader:
        # The tasks' samples run from 20 (image) to ~220 (passkey) tokens, and batches padded
        # to their longest spent ~70% of the compute on padding. Coarse buckets keep the short
        # tasks mixed within a batch (fully sorted, nearly one-task batches learnt the
        # sequence tasks more slowly per step) and the long passkey samples among themselves.
        batches = length_bucket_train_batches(
            self, self.train_lengths, self.hparams.batch_size, bucket_width=96
        )
        return self.loader("train", batch_sampler=batches)

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines on the test split: always answering the most common training
        answer of each task (top1, passkey; a manifest's exact/top1 tasks) and an empty
        answer (WER 1)."""
        from collections import Counter

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
            elif task == "image":
                out["test/top1_majority"] = hits
            elif task == "passkey":
                out["test/passkey_acc_majority"] = hits
            elif task == "asr":
                out["test/wer_empty"] = 1.0
        return out


__all__ = [
    "ChatDataModule",
    "TASKS",
    "TASK_METRIC",
    "ExampleDataset",
    "FusionDataModule",
    "mix_examples",
    "passkey_examples",
    "translation_examples",
]
