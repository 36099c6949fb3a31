"""LanguageSystem: causal-LM pre-training and fine-tuning of the Llama decoder."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torchmetrics import MeanMetric

from herd.data.tokenizer import load_tokenizer
from herd.errors import ConfigError
from herd.models.llama import FLAVORS, Llama, LlamaConfig, generate
from herd.models.pretrained import load_pretrained_llama
from herd.systems.common import HerdSystem, eval_mode
from herd.systems.losses import chunked_cross_entropy
from herd.systems.techniques import apply_training_techniques, check_checkpointing_mode
from herd.utils.config import plain


def llama_config(llama: dict, vocab_size: int) -> LlamaConfig:
    """A named flavor with overrides, or a complete config (as saved by a fine-tuning run);
    a null vocab_size takes the tokenizer's."""
    fields = dict(llama)
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = vocab_size
    flavor = fields.get("flavor")
    if flavor in FLAVORS:
        return LlamaConfig.from_flavor(fields.pop("flavor"), **fields)
    if flavor is not None and fields.get("dim") is None:  # a name, not a complete config
        raise ConfigError(f"model.llama.flavor={flavor!r} is not one of {sorted(FLAVORS)}.")
    return LlamaConfig(**fields)


def with_context(model: Llama, llama: dict, source) -> Llama:
    """Set a trained decoder's context from the run's `context=` (`llama["max_seq_len"]`,
    `llama["rope_scaling"]`). The checkpoint's own RoPE scaling is kept; one without takes
    the context's scaling when that has one: context extension, Llama 3.1's recipe. Past
    the RoPE's original length only a scaled context is accepted."""
    cfg = model.config
    scaling = cfg.rope_scaling or llama.get("rope_scaling")
    wanted = llama.get("max_seq_len") or cfg.max_seq_len
    if wanted > cfg.original_max_seq_len and scaling is None:
        raise ConfigError(
            f"context of {wanted} tokens is longer than the {cfg.original_max_seq_len} that "
            f"{source} supports; pick a shorter context=, or extend it with a context that "
            "sets rope_scaling."
        )
    model.config = replace(cfg, max_seq_len=wanted, rope_scaling=scaling)
    model.reset_rope()
    return model


def load_decoder(path: str, llama: dict, tokenizer: str) -> Llama:
    """A real checkpoint directory (HF / Meta), or a herd language checkpoint (.ckpt) trained
    with `tokenizer`, as an fp32 decoder at this run's context (see `with_context`)."""
    if str(path).endswith(".ckpt"):
        from herd.systems.common import load_system

        system = load_system(path)
        # Same-sized vocabularies would train on silently scrambled ids.
        if system.hparams.get("tokenizer", tokenizer) != tokenizer:
            raise ConfigError(
                f"Checkpoint {path} was trained with tokenizer "
                f"{system.hparams.tokenizer!r}, not {tokenizer!r}; set "
                f"data.tokenizer={system.hparams.tokenizer}."
            )
        model = system.model.float()
    else:
        # Train in fp32 master weights: released checkpoints are bf16, whose precision loses
        # most fine-tuning updates; precision= then decides the compute dtype.
        model = load_pretrained_llama(path, dtype=torch.float32)
    return with_context(model, llama, path)


class LanguageSystem(HerdSystem):
    """Owns training only; the architecture is `herd.models.llama.Llama` (self.model).

    Args:
        llama: LlamaConfig.from_flavor arguments: {"flavor": ..., field overrides}. A null
            vocab_size takes the tokenizer's.
        tokenizer: tokenizer spec (see herd.data.tokenizer.load_tokenizer).
        optimizer: `_partial_` optimizer config (weight_decay applies to matrices only).
        scheduler: `_partial_` scheduler config called with (optimizer, total_steps=...).
        loss_chunk_size: tokens per chunk of the output projection + cross-entropy.
        pretrained: a Llama 3.x checkpoint directory (Hugging Face or Meta layout), or a herd
            language checkpoint (.ckpt), to start from. Its architecture is kept; its RoPE
            scaling too, unless it has none and `llama` brings one (context extension).
        activation_checkpointing: none | attention | selective | full, per decoder layer.
        compile: torch.compile each decoder layer and the loss's per-chunk elementwise work.
    """

    def __init__(
        self,
        llama: dict,
        tokenizer: str = "herd_bpe",
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        loss_chunk_size: int = 1024,
        pretrained: str | None = None,
        activation_checkpointing: str = "none",
        compile: bool = False,
    ):
        super().__init__()
        llama, optimizer, scheduler = plain(llama), plain(optimizer), plain(scheduler)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer)
        if pretrained:
            self.model = load_decoder(pretrained, llama, tokenizer)
            # Checkpoints of this run rebuild the architecture from the resolved config and
            # take the weights from their own state dict, not from the pretrained directory.
            self.hparams.llama = self.model.config.to_dict()
            self.hparams.pretrained = None
        else:
            self.model = Llama(llama_config(llama, self.tokenizer.vocab_size))
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise ConfigError(
                f"Tokenizer {tokenizer!r} has {self.tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {self.model.config.vocab_size}; use the model's own tokenizer "
                "(or model.llama.vocab_size=null to follow the tokenizer)."
            )
        check_checkpointing_mode(activation_checkpointing)  # fail before any training starts
        self.eval_loss = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def configure_model(self) -> None:
        # The one place training techniques touch the model (parallel strategies wrap after).
        apply_training_techniques(
            self.model.layers, self.hparams.activation_checkpointing, self.hparams.compile
        )

    # -- steps ------------------------------------------------------------------------------

    def loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.hidden_states(
            batch["input_ids"], doc_ids=batch.get("doc_ids")
        )  # [B, T, D]
        hp = self.hparams
        return chunked_cross_entropy(
            hidden, self.model.lm_head.weight, batch["labels"], hp.loss_chunk_size, hp.compile
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _eval_step(self, batch: dict, split: str) -> None:
        loss, n_tokens = self.loss(batch)
        self.eval_loss[split].update(loss, weight=n_tokens)  # token-weighted mean over the split

    def _log_eval(self, split: str) -> None:
        loss = self.eval_loss[split].compute()
        self.eval_loss[split].reset()
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=False)
        self.log(f"{split}/ppl", torch.exp(loss).clamp(max=math.exp(20)))

    # -- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def generate_text(
        self, prompts: list[list[int]], max_new_tokens: int = 48, **sampling
    ) -> list[str]:
        """Continue each prompt (token ids) and return prompt + continuation as text."""
        out = []
        with eval_mode(self.model):
            for ids in prompts:
                tokens = torch.tensor([ids], device=self.device)
                result = generate(
                    self.model, tokens, max_new_tokens, eos_id=self.tokenizer.eos_id, **sampling
                )
                out.append(self.tokenizer.decode(result[0].tolist()))
        return out

    def training_flops(self, batch: dict) -> float:
        """FLOPs of one training step on `batch` (for perf/tflops and perf/mfu)."""
        return self.model.config.batch_flops(batch["input_ids"].shape, batch.get("doc_ids"))
