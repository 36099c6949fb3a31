"""TextDataModule: the embedded English corpus, or a user's JSONL manifest, packed into rows."""

from __future__ import annotations

import random

import torch
from torch.utils.data import DataLoader

from herd.data.base import HerdDataModule, check_source
from herd.data.corpus import CORPORA, read_text_manifest, split_documents
from herd.data.numbers import passage_lookup_documents, translation_documents
from herd.data.packing import IGNORE_INDEX, PackedDataset, StagedPackedStream
from herd.data.passkey import passkey_training_documents
from herd.data.sampling import resumable_train_sampler
from herd.data.tokenizer import load_tokenizer
from herd.errors import ConfigError
from herd.utils.config import plain


class TextDataModule(HerdDataModule):
    def __init__(
        self,
        tokenizer: str = "herd_bpe",
        seq_len: int = 512,
        batch_size: int = 8,
        source: str = "python_docs",  # an embedded corpus (herd.data.corpus.CORPORA) or "manifest"
        manifest: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        skip_bad_samples: bool = False,
        num_workers: int = 0,
        seed: int = 0,
        context_stages: list | None = None,
        passkey_docs: int = 0,
        number_docs: int = 0,
        lookup_docs: int = 0,
        whole_documents: bool = False,
    ):
        super().__init__()
        context_stages = plain(context_stages)  # checkpoints must load with weights_only=True
        self.save_hyperparameters()
        check_source(source, (*CORPORA, "manifest"), manifest)
        if context_stages:
            too_long = [n for _, n in context_stages if n > seq_len]
            if too_long:
                raise ConfigError(
                    f"data.context_stages reach {max(too_long)} tokens, beyond the context of {seq_len}; "
                    "pick a context= at least as long as the last stage."
                )
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_stream: StagedPackedStream | None = None
        self.documents: dict[str, list[list[int]]] = {}

    def _texts(self) -> list[str]:
        hp = self.hparams
        if hp.source in CORPORA:
            return CORPORA[hp.source]()
        return read_text_manifest(hp.manifest, skip_bad=hp.skip_bad_samples)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        hp = self.hparams
        splits = split_documents(self._texts(), hp.val_fraction, hp.test_fraction)
        for name, texts in splits.items():
            self.documents[name] = [self.tokenizer.encode(t, bos=True, eos=True) for t in texts]
        if hp.number_docs:
            # English -> German number phrases (held-out phrases never), so the number words
            # the fusion stage reads and writes arrive trained; training only, so held-out
            # loss stays plain prose.
            self.documents["train"] += [
                self.tokenizer.encode(t, bos=True, eos=True)
                for t in translation_documents(hp.number_docs, hp.seed)
            ]
        if hp.lookup_docs:
            # numbered passages asked for by number: in-context lookup, which the review
            # documents' translation questions need (training phrases only, as above)
            self.documents["train"] += [
                self.tokenizer.encode(t, bos=True, eos=True)
                for t in passage_lookup_documents(hp.lookup_docs, hp.seed)
            ]
        if hp.passkey_docs:
            # Retrieval practice mixed into training only, so held-out loss stays plain prose.
            self.documents["train"] += passkey_training_documents(
                self.tokenizer, hp.passkey_docs, random.Random(hp.seed), hp.seq_len
            )
        for name in splits:
            if self.documents[name]:
                self.datasets[name] = PackedDataset(
                    self.documents[name], hp.seq_len, self.tokenizer.pad_id, hp.whole_documents
                )
        if "train" in self.datasets and len(self.datasets["train"]) < hp.batch_size:
            raise ConfigError(
                f"The training split packs into {len(self.datasets['train'])} rows of {hp.seq_len} "
                f"tokens, fewer than data.batch_size={hp.batch_size}; lower the batch size or add data."
            )
        for name in ("train", "val"):
            if name not in self.datasets:
                raise ConfigError(
                    f"The {name} split is empty; give the corpus more documents or raise data.val_fraction."
                )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if not hp.context_stages:
            # endless shuffled passes, positioned after the steps already taken (exact resume)
            size = len(self.datasets["train"])
            return self.loader(
                "train", sampler=resumable_train_sampler(self, size, hp.batch_size), drop_last=True
            )
        if self.trainer is not None and self.trainer.world_size > 1:
            raise ConfigError(
                "data.context_stages feeds one process; with several devices every rank would see the "
                "same batches. Use strategy=single for staged context extension."
            )
        # Staged context extension: batches of batch_size x seq_len tokens, in rows whose length
        # follows the stages. A resumed run continues the stream at its restored step.
        self.train_stream = StagedPackedStream(
            self.documents["train"],
            [tuple(s) for s in hp.context_stages],
            hp.batch_size * hp.seq_len,
            hp.seed,
            self.tokenizer.pad_id,
            hp.whole_documents,
        )
        if self.trainer is not None:
            self.train_stream.step = self.trainer.global_step * self.trainer.accumulate_grad_batches
        return DataLoader(self.train_stream, batch_size=None, num_workers=0)

    # -- references for the logs ------------------------------------------------------------

    def reference_metrics(self) -> dict[str, float]:
        """Trivial baselines written to metrics.json beside the trained model's numbers."""
        self.setup("fit")
        return {"val/unigram_loss": self.unigram_loss("val")}

    def unigram_loss(self, split: str = "val") -> float:
        """Cross-entropy (nats/token) of `split` under an add-one unigram model of the train
        labels: the floor a language model must beat to have learnt anything beyond counts."""
        train = self.datasets["train"].rows["labels"]
        counts = torch.bincount(
            train[train != IGNORE_INDEX], minlength=self.tokenizer.vocab_size
        ).double()
        log_probs = torch.log((counts + 1) / (counts.sum() + len(counts)))
        target = self.datasets[split].rows["labels"]
        target = target[target != IGNORE_INDEX]
        return float(-log_probs[target].mean())

    def sample_prompts(self, n: int, n_tokens: int = 16) -> list[list[int]]:
        """The first `n_tokens` of the first `n` validation documents (for generated samples)."""
        docs = self.documents.get("val") or self.documents["train"]
        return [d[:n_tokens] for d in docs[:n]]


__all__ = ["TextDataModule"]
