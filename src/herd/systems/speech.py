"""SpeechSystem: the Conformer speech encoder trained with CTC, measured by WER.

The encoder (`self.model`, a herd.models.speech.SpeechEncoder) is what later stages reuse:

    encoder = SpeechSystem.load_from_checkpoint(path).model     # or herd.systems.load_system
    hidden, lengths = encoder(waveforms, wave_lengths)          # [B, T', D] at 40 ms, [B]

The CTC head (a linear layer over the CTC units, blank = 0: characters or fitted subwords, see
herd.data.ctc_units) belongs to this stage only and stays here, and so do its units: the
system encodes the batch's transcripts into CTC targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate, WordErrorRate

from herd.data.audio import SpecAugment
from herd.data.ctc_units import load_ctc_units
from herd.models.speech import SpeechEncoder, SpeechEncoderConfig
from herd.systems.common import HerdSystem, eval_mode
from herd.utils.config import plain


def ctc_greedy_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int = 0
) -> list[list[int]]:
    """Best path: the argmax symbol of every real frame, repeats merged, blanks dropped.

    log_probs [B, T, V], lengths [B] -> one list of symbol ids per clip."""
    best = log_probs.argmax(dim=-1)  # [B, T]
    out = []
    for path, n in zip(best.tolist(), lengths.tolist(), strict=True):
        ids, previous = [], None
        for symbol in path[:n]:
            if symbol != previous and symbol != blank_id:
                ids.append(symbol)
            previous = symbol
        out.append(ids)
    return out


class SpeechSystem(HerdSystem):
    """Owns training only; the architecture is `herd.models.speech.SpeechEncoder` (self.model).

    Args:
        ctc_units: what the CTC head predicts: `chars`, `speech_digits_bpe` or a fitted
            tokenizer.json (herd.data.ctc_units). Saved with the checkpoint's hyper-parameters.
        aux_ctc_units: a second CTC head, over other units, on the same encoder states (e.g.
            `chars` beside `speech_digits_bpe`), trained with weight `aux_ctc_weight` and never
            decoded: it keeps in the states what those units need (spelling) for the stages
            that read them. null: none.
        encoder: SpeechEncoderConfig fields (dim, n_layers, n_heads, ffn_dim, conv_kernel, ...).
        spec_augment: SpecAugment arguments (freq/time masks), applied in training only;
            null for none.
        optimizer: `_partial_` optimizer config (weight_decay applies to matrices only).
        scheduler: `_partial_` scheduler config called with (optimizer, total_steps=...).
    """

    def __init__(
        self,
        ctc_units: str = "chars",
        aux_ctc_units: str | None = None,
        aux_ctc_weight: float = 0.5,
        encoder: dict | None = None,
        spec_augment: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ):
        super().__init__()
        encoder, spec_augment = plain(encoder) or {}, plain(spec_augment)
        optimizer, scheduler = plain(optimizer), plain(scheduler)
        self.save_hyperparameters()
        self.units = load_ctc_units(ctc_units)
        self.model = SpeechEncoder(SpeechEncoderConfig(**encoder))
        self.ctc_head = nn.Linear(self.model.config.dim, self.units.vocab_size)
        self.aux_units = load_ctc_units(aux_ctc_units) if aux_ctc_units else None
        if self.aux_units is not None:
            self.aux_ctc_head = nn.Linear(self.model.config.dim, self.aux_units.vocab_size)
        self.spec_augment = SpecAugment(**spec_augment) if spec_augment else nn.Identity()
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.wer = nn.ModuleDict({"val": WordErrorRate(), "test": WordErrorRate()})
        self.cer = nn.ModuleDict({"val": CharErrorRate(), "test": CharErrorRate()})

    # -- model ------------------------------------------------------------------------------

    def encode(self, waveforms: torch.Tensor, wave_lengths: torch.Tensor):
        """-> encoder states [B, T', D], frame lengths [B] (SpecAugment in training only)."""
        features, frame_lengths = self.model.features(waveforms, wave_lengths)  # [B, T, 80]
        features = self.spec_augment(features)  # identity outside training
        return self.model.encode(features, frame_lengths)  # [B, T', D]

    def log_probs(self, waveforms: torch.Tensor, wave_lengths: torch.Tensor):
        """-> CTC log-probabilities [B, T', V] (fp32), frame lengths [B]."""
        hidden, lengths = self.encode(waveforms, wave_lengths)
        return F.log_softmax(self.ctc_head(hidden).float(), dim=-1), lengths

    def targets(self, texts: list[str], units=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Transcripts -> CTC targets [B, S] (padded with the blank), their lengths [B], in
        `units` (default: the decoded head's)."""
        units = units or self.units
        encoded = [torch.tensor(units.encode(t), dtype=torch.long) for t in texts]
        padded = pad_sequence(encoded, batch_first=True, padding_value=units.blank_id)
        lengths = torch.tensor([len(ids) for ids in encoded])
        return padded.to(self.device), lengths.to(self.device)

    def ctc_loss(self, log_probs, lengths, texts: list[str], units) -> torch.Tensor:
        targets, target_lengths = self.targets(texts, units)
        return F.ctc_loss(
            log_probs.transpose(0, 1),  # [T', B, V]: ctc_loss's layout
            targets,
            lengths,
            target_lengths,
            blank=units.blank_id,
            reduction="mean",  # per target unit, then over the batch
            zero_infinity=True,  # a clip too short for its transcript gives no gradient, not NaN
        )

    def loss(self, batch: dict):
        """CTC loss of the decoded head (plus the weighted auxiliary head's), its
        log-probabilities [B, T', V] and frame lengths [B]."""
        hidden, lengths = self.encode(batch["waveforms"], batch["wave_lengths"])
        log_probs = F.log_softmax(self.ctc_head(hidden).float(), dim=-1)
        loss = self.ctc_loss(log_probs, lengths, batch["texts"], self.units)
        if self.aux_units is not None:
            aux_log_probs = F.log_softmax(self.aux_ctc_head(hidden).float(), dim=-1)
            aux = self.ctc_loss(aux_log_probs, lengths, batch["texts"], self.aux_units)
            loss = loss + self.hparams.aux_ctc_weight * aux
        return loss, log_probs, lengths

    @torch.no_grad()
    def transcribe(self, waveforms: torch.Tensor, wave_lengths: torch.Tensor) -> list[str]:
        with eval_mode(self):
            log_probs, lengths = self.log_probs(
                waveforms.to(self.device), wave_lengths.to(self.device)
            )
        return self.decode(log_probs, lengths)

    def decode(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        ids = ctc_greedy_decode(log_probs, lengths, self.units.blank_id)
        return [" ".join(self.units.decode(seq).split()) for seq in ids]

    # -- steps ------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, _ = self.loss(batch)
        batch_size = len(batch["texts"])
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size
        )
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        loss, log_probs, lengths = self.loss(batch)
        self.eval_loss[split].update(loss, weight=len(batch["texts"]))
        hypotheses = self.decode(log_probs, lengths)
        self.wer[split].update(hypotheses, batch["texts"])
        self.cer[split].update(hypotheses, batch["texts"])

    def _log_eval(self, split: str) -> None:
        for name, metric in (("loss", self.eval_loss), ("wer", self.wer), ("cer", self.cer)):
            value = metric[split].compute()
            metric[split].reset()
            self.log(f"{split}/{name}", value, prog_bar=split == "val" and name != "cer")


__all__ = ["SpeechSystem", "ctc_greedy_decode"]
