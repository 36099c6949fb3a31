"""Generated text written to TensorBoard's Text tab after every validation."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class TextSamples(L.Callback):
    """Greedy continuations of the first tokens of held-out documents (`samples/text`)."""

    def __init__(self, num_prompts: int = 3, prompt_tokens: int = 16, max_new_tokens: int = 48):
        self.num_prompts = num_prompts
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.last_samples: list[str] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if "fsdp" in type(trainer.strategy).__name__.lower():
            return  # sharded parameters: rank 0 alone cannot run the model
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        datamodule = trainer.datamodule
        if not loggers or datamodule is None or not hasattr(datamodule, "sample_prompts"):
            return
        prompts = datamodule.sample_prompts(self.num_prompts, self.prompt_tokens)
        self.last_samples = pl_module.generate_text(prompts, self.max_new_tokens)
        tokenizer = pl_module.tokenizer
        rows = []
        for prompt, text in zip(prompts, self.last_samples, strict=True):
            shown_prompt = tokenizer.decode(prompt)
            continuation = text[len(shown_prompt) :] if text.startswith(shown_prompt) else text
            rows.append(f"**{_md(shown_prompt)}** {_md(continuation)}")
        body = "\n\n---\n\n".join(rows)
        for logger in loggers:
            logger.experiment.add_text("samples/text", body, global_step=trainer.global_step)


def _md(text: str) -> str:
    """Keep generated text literal in TensorBoard's Markdown renderer."""
    for ch in "\\`*_[]<>#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", "  \n")
