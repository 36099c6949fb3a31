"""FusionSystem: fine-tunes the composed multimodal model on interleaved samples and
measures every task through the language model's own generated answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore, WordErrorRate

from herd.data.audio import SpecAugment
from herd.data.chat_module import ChatDataFacts, ChatDataModule, ChatInputSpec
from herd.data.digits_tasks import TASKS
from herd.data.tokenizer import IMAGE, SPEECH, VIDEO, load_tokenizer
from herd.errors import ConfigError
from herd.models.fusion import build_fusion_model
from herd.models.llama import Llama
from herd.models.mllama import MllamaConfig, MllamaImageEncoder, mllama_cross_attention
from herd.models.mllama_vision import MllamaVisionConfig
from herd.models.pretrained_mllama import is_mllama_checkpoint, load_pretrained_mllama
from herd.models.speech import SpeechEncoder, SpeechEncoderConfig
from herd.models.vision import ImageEncoder, ImageEncoderConfig, TanhGate
from herd.systems.common import HerdSystem, load_system
from herd.systems.finetune import apply_finetune_strategy
from herd.systems.fusion_export import read_fusion_export
from herd.systems.language import llama_config, load_decoder, with_context
from herd.systems.losses import chunked_cross_entropy, embedding_ctc_loss
from herd.utils.config import plain

log = logging.getLogger(__name__)


def _stage_system(checkpoint: str, expected: str) -> HerdSystem:
    """A stage's system, reopened from its checkpoint so that its model (never the
    LightningModule itself) can be composed."""
    system = load_system(checkpoint)
    if type(system).__name__ != expected:
        raise ConfigError(
            f"{checkpoint} holds a {type(system).__name__}, not a {expected}; pass the "
            f"checkpoint of the matching stage."
        )
    return system


class FusionSystem(HerdSystem):
    """Owns training only; the architecture is `herd.models.fusion.FusionModel` (self.model).

    Args:
        language: {"checkpoint": a LanguageSystem .ckpt or null, "pretrained": a Llama 3.x
            checkpoint directory (Hugging Face or Meta layout, with its tokenizer) or null,
            "llama": flavor + overrides (when built fresh; max_seq_len and rope_scaling,
            from context=, apply to a checkpoint's decoder too), "tokenizer": spec (when
            built fresh; null: herd_bpe; a checkpoint or release brings its own)}.
        vision: {"checkpoint": a VisionSystem .ckpt or null, "encoder": ImageEncoderConfig
            fields (when built fresh)}, or null for no image encoder.
        speech: {"checkpoint": a SpeechSystem .ckpt or null, "encoder": SpeechEncoderConfig
            fields (when built fresh), "adapter": SpeechAdapterConfig fields}, or null.
        finetune: {"strategy": full|partial|adapter|lora, "top_layers": N (partial),
            "lora": {"rank", "alpha", "dropout", "targets"}, "frozen": parts kept fixed
            under any strategy (herd.systems.finetune.PARTS)}.
        cross_attention_every: a cross-attention layer before every k-th decoder layer.
        max_new_tokens: answer length limit when generating for the task metrics.
        gate_lr_multiplier: learning-rate factor for the cross-attention gates. They start
            at 0, so what they gate gets no gradient until they open; a small model trained
            for minutes needs them to open faster than the rest learns.
        encoder_lr_multiplier: learning-rate factor for the stage-trained image and speech
            encoders, so the fresh adapters' noisy early gradients do not wash out their
            features (at x1 a linear probe on the image features fell from 97% to 36%).
        spec_augment: SpecAugment arguments for the speech encoder's log-mels in training
            (null: none); the corpus has few clips, which the decoder otherwise memorises.
        init_from: a FusionSystem checkpoint, or a herd-export directory of one
            (herd.systems.fusion_export), to start from: its architecture (language, vision,
            speech, cross_attention_every replace this config's) and weights, with this
            run's context (e.g. a fusion_digits model continued on review documents). A
            source without video gains this run's `video` adapter, fresh.
        video: the video adapter, {TemporalAggregatorConfig fields besides dim, "every":
            a video cross-attention layer ahead of every k-th image one, "init": "random"
            or "image" (each video cross-attention layer starts as a copy of the image one
            it precedes, gates closed: with init_from, layers that already read the image
            encoder's tokens)}, or null for none (herd.models.video; frames go through the
            image encoder).
        speech_ctc_weight: weight of an auxiliary training loss on the speech adapter: CTC
            of each clip's adapter embeddings against the token ids of what the clip says
            (the examples' transcripts; clips without one are left out), every embedding
            classified over the decoder's input embeddings (held fixed) by cosine
            similarity, the <|speech|> placeholder's row as CTC's blank. It draws each
            80 ms embedding toward the token spoken there, so that transcribing becomes
            copying. 0: off.
        speech_ctc_temperature: the cosine similarities' temperature in that loss.
    Checkpoints of this system rebuild every part from the resolved configs recorded here,
    so they load without the stage checkpoints they started from.
    """

    # A batch without images, speech or video leaves those parts out of its step
    # (herd.utils.strategies.strategy_override: DDP then looks for unused parameters).
    skips_parameters = True

    def __init__(
        self,
        language: dict,
        vision: dict | None = None,
        speech: dict | None = None,
        finetune: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        cross_attention_every: int = 4,
        loss_chunk_size: int = 1024,
        max_new_tokens: int = 24,
        gate_lr_multiplier: float = 1.0,
        encoder_lr_multiplier: float = 1.0,
        spec_augment: dict | None = None,
        init_from: str | None = None,
        video: dict | None = None,
        speech_ctc_weight: float = 0.0,
        speech_ctc_temperature: float = 0.1,
    ):
        super().__init__()
        language, vision, speech, video = (
            plain(language),
            plain(vision),
            plain(speech),
            plain(video),
        )
        spec_augment = plain(spec_augment)
        finetune, optimizer, scheduler = plain(finetune), plain(optimizer), plain(scheduler)
        if speech_ctc_weight < 0 or speech_ctc_temperature <= 0:
            raise ConfigError(
                f"model.speech_ctc_weight={speech_ctc_weight} must be >= 0 and "
                f"model.speech_ctc_temperature={speech_ctc_temperature} > 0."
            )
        self.save_hyperparameters()

        llama = language.get("llama") or {}  # the flavor when built fresh; context= either way
        source = exported = None
        mllama = released = None  # a Llama 3.2 Vision release and its MllamaConfig
        if init_from and Path(init_from).is_dir():  # a herd-export directory: the same, as files
            architecture, exported = read_fusion_export(init_from)
            language = {"pretrained": architecture["decoder"]}
            vision, speech = architecture["vision"], architecture["speech"]
            video = self.hparams.video = architecture.get("video")
            cross_attention_every = architecture["cross_attention_every"]
            self.hparams.cross_attention_every = cross_attention_every
        elif init_from:  # the architecture recorded by the source; its weights are loaded below
            source = _stage_system(init_from, "FusionSystem")
            trained = source.hparams
            language = {
                "llama": trained.language["llama"],
                "tokenizer": trained.language["tokenizer"],
            }
            vision, speech = trained.vision, trained.speech
            # a source without video gains this run's video adapter (fresh, loaded below)
            video = self.hparams.video = trained.get("video") or video
            cross_attention_every = trained.cross_attention_every
            self.hparams.cross_attention_every = cross_attention_every
        if source is not None:
            tokenizer_spec = language["tokenizer"]
            decoder = Llama(llama_config(language["llama"], None))
            with_context(decoder, llama, init_from)
        elif language.get("pretrained") and is_mllama_checkpoint(language["pretrained"]):
            # Llama 3.2 Vision: decoder, image encoder and cross-attention as released
            tokenizer_spec = str(language["pretrained"])
            if vision and vision.get("checkpoint"):
                raise ConfigError(
                    f"{tokenizer_spec} is a Llama 3.2 Vision checkpoint with its own image "
                    "encoder; drop model.vision.checkpoint."
                )
            mllama = load_pretrained_mllama(tokenizer_spec, dtype=torch.float32)
            decoder = with_context(mllama.decoder, llama, tokenizer_spec)
            released = mllama.config
        elif language.get("pretrained"):  # a released Llama, with its own tokenizer
            tokenizer_spec = str(language["pretrained"])
            decoder = load_decoder(tokenizer_spec, llama, tokenizer_spec)
        elif language.get("checkpoint"):
            stage = _stage_system(language["checkpoint"], "LanguageSystem")
            decoder = with_context(stage.model.float(), llama, language["checkpoint"])
            tokenizer_spec = stage.hparams.tokenizer
        else:
            tokenizer_spec = language.get("tokenizer") or "herd_bpe"
            vocab = load_tokenizer(tokenizer_spec).vocab_size
            decoder = Llama(llama_config({"flavor": "small", **llama}, vocab))
        named = language.get("tokenizer")
        if source is None and named and str(named) != str(tokenizer_spec):
            # a checkpoint's or release's decoder was trained on its own tokenizer's ids
            raise ConfigError(
                f"model.language.tokenizer={named} differs from {tokenizer_spec}, the tokenizer "
                "the language model was trained with; drop model.language.tokenizer (the "
                "checkpoint brings its own)."
            )
        self.tokenizer = load_tokenizer(tokenizer_spec)

        if released is None and vision and vision.get("mllama"):  # a checkpoint's record
            record = vision["mllama"]
            released = MllamaConfig(
                decoder.config,
                record["cross_attention_layers"],
                MllamaVisionConfig(**record["vision"]),
            )
        image_encoder = cross_attention = None
        if released is not None:
            if mllama is not None:  # the released weights
                image_encoder = MllamaImageEncoder(
                    mllama.vision_model, mllama.multi_modal_projector
                )
                cross_attention = mllama.cross_attention
            else:  # their shapes; the checkpoint's weights load into them
                image_encoder = MllamaImageEncoder.fresh(released.vision, released.text.dim)
                cross_attention = mllama_cross_attention(released)
        elif vision:
            if vision.get("checkpoint"):
                image_encoder = _stage_system(vision["checkpoint"], "VisionSystem").model
            else:
                image_encoder = ImageEncoder(ImageEncoderConfig(**vision["encoder"]))
        speech_encoder = None
        if speech:
            if speech.get("checkpoint"):
                speech_encoder = _stage_system(speech["checkpoint"], "SpeechSystem").model
            else:
                speech_encoder = SpeechEncoder(SpeechEncoderConfig(**(speech.get("encoder") or {})))

        special = self.tokenizer.special_ids
        if released is not None and special.get(IMAGE) != released.image_token_id:
            raise ConfigError(
                f"Tokenizer {tokenizer_spec} puts <|image|> at {special.get(IMAGE)}, but the "
                f"Llama 3.2 Vision weights expect it at {released.image_token_id}."
            )
        rows = decoder.embed_tokens.num_embeddings
        if video and video.get("init", "random") not in ("random", "image"):
            raise ConfigError(
                f"model.video.init={video['init']!r}: use random or image (the video "
                "cross-attention starts as a copy of the image cross-attention)."
            )
        if video and special.get(VIDEO, rows) >= rows:
            raise ConfigError(
                f"The decoder's vocabulary ({rows} rows) has no <|video|> token (tokenizer "
                f"{tokenizer_spec}); train the language stage with a tokenizer that has it "
                "(herd_bpe does since 2026-12-06)."
            )
        if ((speech or {}).get("adapter") or {}).get("merge_by_ctc") and not speech_ctc_weight:
            raise ConfigError(
                "model.speech.adapter.merge_by_ctc=true reads the adapter's CTC path, which "
                "only the auxiliary loss trains; set model.speech_ctc_weight > 0 (the recipe "
                "uses 0.5)."
            )
        self.model = build_fusion_model(
            decoder,
            image_token_id=special[IMAGE],
            speech_token_id=special[SPEECH],
            image_encoder=image_encoder,
            speech_encoder=speech_encoder,
            cross_attention_every=cross_attention_every,
            speech_adapter=(speech or {}).get("adapter"),
            speech_augment=SpecAugment(**spec_augment) if spec_augment else None,
            cross_attention=cross_attention,
            video_token_id=special.get(VIDEO),
            video={k: v for k, v in video.items() if k != "init"} if video else None,
        )
        source_video = source is not None and source.model.video_aggregator is not None
        if source is not None:
            if source_video or not video:
                self.model.load_state_dict(source.model.state_dict())  # strict: same architecture
            else:  # the video adapter is this run's own; every other weight is the source's
                missing, unexpected = self.model.load_state_dict(
                    source.model.state_dict(), strict=False
                )
                assert not unexpected and all(k.startswith("video_") for k in missing)
            self.hparams.init_from = None  # the weights now live in this run's checkpoints
        if (
            video
            and video.get("init", "random") == "image"
            and not source_video
            and exported is None
        ):
            self.model.video_cross_attention_from_image()  # a fresh adapter only
        if exported is not None:  # the decoder came from its directory above
            missing, unexpected = self.model.load_state_dict(exported, strict=False)
            missing = [k for k in missing if not k.startswith("decoder.")]
            if missing or unexpected:
                raise ConfigError(
                    f"The weights of {init_from} do not fit its fusion.json: missing "
                    f"{missing[:3]}, unexpected {unexpected[:3]}."
                )
            self.hparams.init_from = None
        finetune = finetune or {"strategy": "full"}
        self.parameter_counts = apply_finetune_strategy(
            self.model,
            finetune.get("strategy", "full"),
            finetune.get("top_layers", 2),
            finetune.get("lora"),
            tuple(finetune.get("frozen") or ()),
        )
        log.info(
            "Fine-tuning strategy %s: %d trainable, %d frozen parameters.",
            finetune.get("strategy", "full"),
            self.parameter_counts["trainable"],
            self.parameter_counts["frozen"],
        )
        # What a checkpoint needs to rebuild this architecture without the stage checkpoints.
        self.hparams.language = {"llama": decoder.config.to_dict(), "tokenizer": tokenizer_spec}
        if released is not None:
            self.hparams.vision = {
                "mllama": {
                    "vision": released.vision.to_dict(),
                    "cross_attention_layers": list(released.cross_attention_layers),
                }
            }
        elif image_encoder is not None:
            self.hparams.vision = {"encoder": image_encoder.config.to_dict()}
        if speech_encoder is not None:
            self.hparams.speech = {
                "encoder": speech_encoder.config.to_dict(),
                "adapter": (speech or {}).get("adapter"),
            }

        self.eval_loss = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        # {split: {logged name: metric}}, built in setup() from the data's tasks
        self.task_metrics = nn.ModuleDict({s: nn.ModuleDict() for s in ("val", "test")})
        self.predictions: dict[str, list[dict]] = {"val": [], "test": []}
        self.data_facts = ChatDataFacts()  # the data's, from setup()

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        # after the data's own setup (Lightning's order): the facts of the data being used
        self.data_facts = (
            datamodule.facts() if isinstance(datamodule, ChatDataModule) else ChatDataFacts()
        )
        task_metric, far = self.data_facts.task_metric, self.data_facts.evidence_far_tokens
        suffixes = ("", "_near", "_far") if far else ("",)
        for split in ("val", "test"):
            metrics = self.task_metrics[split]
            for name in sorted({m for m in task_metric.values() if m}):
                for suffix in suffixes:
                    if name + suffix not in metrics:
                        metrics[name + suffix] = _metric(name)

    def input_spec(self) -> ChatInputSpec:
        """What this model fixes about its inputs, for the data module (setup_for)."""
        encoder = self.model.image_encoder
        # without an image encoder no image is read; drawn at the default encoder's shape
        image = encoder.config if encoder is not None else ImageEncoderConfig()
        size, channels = image.img_size, image.in_chans
        speech = self.model.speech_encoder
        speech_tokens, rate = (
            (self.model.speech_tokens, speech.config.sample_rate) if speech else (None, None)
        )
        aggregator = self.model.video_aggregator
        max_frames = aggregator.config.max_frames if aggregator is not None else None
        return ChatInputSpec(self.tokenizer, speech_tokens, rate, size, channels, max_frames)

    def on_fit_start(self) -> None:
        counts = {f"model/{k}_params": float(v) for k, v in self.parameter_counts.items()}
        # how much of the documents the context cuts (review documents), in TensorBoard too
        counts.update(self.data_facts.truncation)
        for logger in self.loggers:
            if hasattr(logger, "log_metrics"):
                logger.log_metrics(counts, step=0)

    # -- steps ------------------------------------------------------------------------------

    def _inputs(self, batch: dict) -> dict:
        keys = ("images", "image_mask", "audio", "audio_lengths", "videos", "frame_mask")
        return {k: batch[k] for k in keys if k in batch}

    def loss(
        self,
        batch: dict,
        token_weights: torch.Tensor | None = None,
        speech: tuple[torch.Tensor, torch.Tensor] | None = None,  # encode_speech's, if done
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.hidden_states(  # [B, T, D]
            batch["input_ids"], **self._inputs(batch), speech=speech
        )
        return chunked_cross_entropy(
            hidden,
            self.model.decoder.lm_head.weight,
            batch["labels"],
            self.hparams.loss_chunk_size,
            token_weights=token_weights,
        )

    def speech_ctc_loss(
        self, batch: dict, speech: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor | None:
        """The auxiliary CTC loss on the adapter's embeddings of the batch's clips (see
        speech_ctc_weight); None when no clip has a transcript."""
        if "speech_targets" not in batch:
            return None
        embeddings, lengths = speech  # [M, L, D], [M]: the real clips in (sample, clip) order
        real_clip = batch["audio_lengths"] > 0  # [B, K]
        said = [  # each real clip's token ids, [] where unknown
            (ids[k] if k < len(ids) else [])
            for ids, row in zip(batch["speech_targets"], real_clip.tolist(), strict=True)
            for k, real in enumerate(row)
            if real
        ]
        keep = [m for m, ids in enumerate(said) if ids]
        if not keep:
            return None
        return embedding_ctc_loss(
            embeddings[keep],
            lengths[keep],
            [said[m] for m in keep],
            self.model.decoder.embed_tokens.weight.detach(),
            blank=self.model.speech_token_id,
            temperature=self.hparams.speech_ctc_temperature,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        task_weight = self.data_facts.task_loss_weight
        token_weights = None
        if task_weight:  # [B, 1]: every answer token of a sample weighs what its task does
            weights = [task_weight.get(task, 1.0) for task in batch["task"]]
            token_weights = torch.tensor(weights, device=batch["labels"].device)[:, None]
            token_weights = token_weights.expand_as(batch["labels"])  # [B, T]
        speech = None
        if self.hparams.speech_ctc_weight and "audio" in batch:
            speech = self.model.encode_speech(batch["audio"], batch["audio_lengths"])
        loss, n_tokens = self.loss(batch, token_weights, speech)  # mean over the answer tokens
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        # Every answer token weighs the same, whichever batch it lands in. Batches are
        # bucketed by length and so nearly one task each; a per-batch mean would give a
        # two-token image answer the weight of a twelve-token transcript (measured: ASR WER
        # 0.48 -> 0.63 and translation BLEU 15 -> 0 at step 400).
        per_batch = self.data_facts.answer_tokens_per_batch
        total = loss * n_tokens / per_batch if per_batch else loss
        ctc = self.speech_ctc_loss(batch, speech) if speech is not None else None
        if ctc is not None:
            self.log("train/speech_ctc", ctc, on_step=True, on_epoch=False)
            total = total + self.hparams.speech_ctc_weight * ctc
        elif speech is not None and batch_idx == 0:  # said each epoch, never skipped silently
            log.warning(
                "model.speech_ctc_weight=%s but the clips carry no transcripts (the digits "
                "corpus's do, chat manifests' do not): no CTC loss on them.",
                self.hparams.speech_ctc_weight,
            )
        return total

    def answer(self, batch: dict, b: int) -> str:
        """Generate the answer of sample `b` of a batch from its prompt."""
        prompt = batch["input_ids"][b : b + 1, : int(batch["prompt_len"][b])]
        images = audio = lengths = None
        if "images" in batch and bool(batch["image_mask"][b].any()):
            images = batch["images"][b : b + 1, batch["image_mask"][b]]  # [1, I, C, H, W]
        if "audio" in batch and bool(batch["audio_lengths"][b].any()):
            lengths = batch["audio_lengths"][b : b + 1]  # [1, K]
            audio = batch["audio"][b : b + 1, :, : int(lengths.max())]  # [1, K, S]
        videos = frame_mask = None
        if "videos" in batch and bool(batch["frame_mask"][b].any()):
            real = batch["frame_mask"][b].any(dim=-1)  # [V]
            videos = batch["videos"][b : b + 1, real]  # [1, V, F, C, H, W]
            frame_mask = batch["frame_mask"][b : b + 1, real]  # [1, V, F]
        ids = self.model.generate(
            prompt,
            self.hparams.max_new_tokens,
            stop_ids=(self.tokenizer.eot_id, self.tokenizer.eos_id),
            images=images,
            audio=audio,
            audio_lengths=lengths,
            videos=videos,
            frame_mask=frame_mask,
        )
        return self.tokenizer.decode(ids).strip()

    def _eval_step(self, batch: dict, split: str) -> None:
        loss, n_tokens = self.loss(batch)
        self.eval_loss[split].update(loss, weight=n_tokens)
        task_metric, far = self.data_facts.task_metric, self.data_facts.evidence_far_tokens
        distances = batch.get("evidence_distance")
        metrics = self.task_metrics[split]
        for b, task in enumerate(batch["task"]):
            name = task_metric.get(task)
            if name is None:  # a task scored by its loss alone (a manifest's metric: none)
                continue
            prediction, reference = self.answer(batch, b), batch["answer"][b]
            names = [name]
            if far and distances is not None:
                names.append(name + ("_far" if distances[b] > far else "_near"))
            for key in names:
                _update(metrics[key], name, prediction, reference)
            record = {"task": task, "prediction": prediction, "reference": reference}
            for key in ("evidence_distance", "evidence_lost"):
                if key in batch:
                    record[key] = batch[key][b]
            # every test answer is kept (test_predictions.jsonl); media for a few per task
            shown = sum(p["task"] == task for p in self.predictions[split]) < 4
            first_image = first_clip = first_video = None
            if shown and "images" in batch and bool(batch["image_mask"][b].any()):
                first_image = batch["images"][b, 0].cpu()
            if shown and "audio" in batch and int(batch["audio_lengths"][b, 0]) > 0:
                first_clip = batch["audio"][b, 0, : int(batch["audio_lengths"][b, 0])].cpu()
            if shown and "videos" in batch and bool(batch["frame_mask"][b, 0].any()):
                first_video = batch["videos"][b, 0, batch["frame_mask"][b, 0]].cpu()  # [F, C, H, W]
            if shown or split == "test":
                self.predictions[split].append(
                    {**record, "image": first_image, "audio": first_clip, "video": first_video}
                )

    def _log_eval(self, split: str) -> None:
        self.log(f"{split}/loss", self.eval_loss[split].compute(), prog_bar=split == "val")
        self.eval_loss[split].reset()
        for name, metric in self.task_metrics[split].items():
            if metric.update_called:
                value = metric.compute()
                # torchmetrics' BLEU is in [0, 1]; report it x100 as sacreBLEU does
                if _kind(name) == "bleu":
                    value = value * 100
                self.log(f"{split}/{name}", value, prog_bar=split == "val" and name == "top1")
            metric.reset()
        if split == "test" and self.trainer.is_global_zero:
            self._write_predictions(split)

    def _write_predictions(self, split: str) -> None:
        """Every test answer as one JSON line (test_predictions.jsonl in the run directory),
        for the per-distance analysis of herd-report."""
        root = Path(self.trainer.default_root_dir)
        if not root.is_dir():
            return
        keys = ("task", "prediction", "reference", "evidence_distance", "evidence_lost")
        lines = [json.dumps({k: p[k] for k in keys if k in p}) for p in self.predictions[split]]
        (root / f"{split}_predictions.jsonl").write_text("\n".join(lines) + "\n")

    def on_validation_epoch_start(self) -> None:
        self.predictions["val"] = []

    def on_test_epoch_start(self) -> None:
        self.predictions["test"] = []

    def lr_multipliers(self) -> dict[str, float]:
        hp = self.hparams
        gates = {  # the image and video cross-attention's gates, found by type
            f"model.{part}.{name}.gate": hp.gate_lr_multiplier
            for part in ("cross_attention", "video_cross_attention")
            for name, module in (getattr(self.model, part) or nn.Module()).named_modules()
            if isinstance(module, TanhGate)
        }
        return {
            **gates,
            "model.image_encoder.*": hp.encoder_lr_multiplier,
            "model.speech_encoder.*": hp.encoder_lr_multiplier,
        }


def _kind(name: str) -> str:
    """wer, bleu or exact: how answers are scored for a logged metric name (top1, wer,
    bleu_st, passkey_acc, or a manifest task's "{task}/{metric}", with _near / _far)."""
    metric = name.rsplit("/", 1)[-1]
    if metric.startswith("wer"):
        return "wer"
    return "bleu" if metric.startswith("bleu") else "exact"


def _metric(name: str):
    """The torchmetrics object that scores answers for `name`."""
    kind = _kind(name)
    if kind == "wer":
        return WordErrorRate()
    if kind == "bleu":
        return SacreBLEUScore(tokenize="13a")
    return MeanMetric()  # exact-match accuracy


def _update(metric, name: str, prediction: str, reference: str) -> None:
    kind = _kind(name)
    if kind == "wer":
        metric.update([prediction], [reference])
    elif kind == "bleu":
        metric.update([prediction], [[reference]])
    else:
        metric.update(float(prediction == reference))


__all__ = ["TASKS", "FusionSystem"]
