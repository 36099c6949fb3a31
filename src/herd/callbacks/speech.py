"""Speech samples in TensorBoard after every validation: the audio, its reference and the
model's transcript, and the log-mel spectrogram the encoder saw."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from herd.callbacks.throughput import StepRate
from herd.data.speech import collate_clips


class SpeechSamples(L.Callback):
    """`samples/audio_i` (Audio tab), `samples/transcripts` (Text tab: reference vs.
    hypothesis) and `samples/log_mel_i` (Images tab) for the first `num_clips` validation clips.
    The audio is logged once (it does not change); transcripts and images every validation."""

    def __init__(self, num_clips: int = 3):
        self.num_clips = num_clips
        self.last_transcripts: list[tuple[str, str]] = []
        self._audio_logged = False

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_clips <= 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        datamodule = trainer.datamodule
        if not loggers or datamodule is None or not hasattr(datamodule, "sample_clips"):
            return
        clips = datamodule.sample_clips(self.num_clips)
        batch = collate_clips([{"waveform": c.waveform, "text": c.text} for c in clips])
        hypotheses = pl_module.transcribe(batch["waveforms"], batch["wave_lengths"])
        self.last_transcripts = [(c.text, h) for c, h in zip(clips, hypotheses, strict=True)]
        with torch.no_grad():
            features, frame_lengths = pl_module.model.features(
                batch["waveforms"].to(pl_module.device), batch["wave_lengths"].to(pl_module.device)
            )  # [B, T, 80]
        step = trainer.global_step
        rate = pl_module.model.config.sample_rate
        rows = ["| clip | reference | hypothesis |", "|---|---|---|"]
        for i, (clip, hypothesis) in enumerate(zip(clips, hypotheses, strict=True)):
            rows.append(f"| {i} | {clip.text} | {hypothesis or '(nothing)'} |")
        for logger in loggers:
            writer = logger.experiment
            writer.add_text("samples/transcripts", "\n".join(rows), global_step=step)
            for i, clip in enumerate(clips):
                if not self._audio_logged:
                    writer.add_audio(
                        f"samples/audio_{i}",
                        clip.waveform[None],
                        global_step=step,
                        sample_rate=rate,
                    )
                mel = features[i, : frame_lengths[i]].float().cpu()
                writer.add_figure(
                    f"samples/log_mel_{i}",
                    _mel_figure(mel, clip.text, hypotheses[i]),
                    global_step=step,
                )
        self._audio_logged = True


def _mel_figure(mel: torch.Tensor, reference: str, hypothesis: str):
    """A matplotlib figure of a log-mel spectrogram [T, n_mels] (time on x, 10 ms frames)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.5))
    ax.imshow(mel.T.numpy(), origin="lower", aspect="auto", cmap="magma")
    ax.set_xlabel("frame (10 ms)")
    ax.set_ylabel("mel bin")
    ax.set_title(f"ref: {reference}\nhyp: {hypothesis}", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


class AudioThroughput(StepRate):
    """`perf/audio_seconds_per_sec`: seconds of speech trained on per second of a training
    step (see StepRate, which adds perf/tflops)."""

    metric = "perf/audio_seconds_per_sec"

    def __init__(self, window: int = 10, lengths_key: str = "wave_lengths", flops_every_n_steps=50):
        super().__init__(window, flops_every_n_steps)
        self.lengths_key = lengths_key

    def items(self, batch, pl_module) -> float:
        return batch[self.lengths_key].sum().item() / pl_module.model.config.sample_rate
