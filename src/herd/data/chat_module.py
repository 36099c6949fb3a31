"""The base of the fusion stage's data modules (ChatDataModule) and the two typed objects
it exchanges with the fusion system: ChatInputSpec (model -> data: how to encode inputs)
and ChatDataFacts (data -> system: how to score and weight what it serves)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from herd.data.audio import SAMPLE_RATE
from herd.data.base import HerdDataModule
from herd.data.chat import collate
from herd.data.digits_tasks import TASK_METRIC
from herd.data.tokenizer import Tokenizer
from herd.errors import ConfigError


@dataclass(frozen=True)
class ChatInputSpec:
    """What the fusion model being trained fixes about its inputs (FusionSystem.input_spec):
    prompts are encoded with its tokenizer, each clip gets `speech_tokens(num_samples)`
    placeholders (None: the model has no speech encoder) and its encoder reads audio at
    `sample_rate`, images are drawn at its image encoder's size and channels, and a clip
    may hold up to `max_video_frames` frames (None: the model has no video adapter)."""

    tokenizer: Tokenizer
    speech_tokens: Callable[[int], int] | None
    sample_rate: int | None
    image_size: int
    channels: int
    max_video_frames: int | None = None


@dataclass(frozen=True)
class ChatDataFacts:
    """What the chat data tells the fusion system once set up (ChatDataModule.facts()): the
    metric that scores each task (None: its loss alone), the evidence distance beyond which
    an answer also counts as `_far` (None: no near/far split), the mean answer tokens per
    training batch (the loss weight that makes every answer token count the same), the
    truncation counts to log, and the training loss's weight of each task's answer tokens
    (tasks not named weigh 1)."""

    task_metric: Mapping[str, str | None] = field(default_factory=lambda: dict(TASK_METRIC))
    evidence_far_tokens: int | None = None
    answer_tokens_per_batch: float | None = None
    truncation: Mapping[str, float] = field(default_factory=dict)
    task_loss_weight: Mapping[str, float] = field(default_factory=dict)


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
        self.task_loss_weight: dict[str, float] = {}  # FusionSystem.training_step

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
            dict(self.task_loss_weight),
        )
