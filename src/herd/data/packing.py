"""Packing tokenised documents into fixed-length training rows.

Documents are laid end to end in one stream (each as <|begin_of_text|> ... <|end_of_text|>)
and cut into rows of `seq_len` inputs with their next-token labels. Each row keeps the id of
the document every token came from, so attention can stay inside documents and RoPE
positions can restart at each one. A label that would predict across a document boundary
is ignored.
"""

from __future__ import annotations

import itertools
import random

import torch

# Label of positions that carry no loss (the document boundary, padding, prompts).
IGNORE_INDEX = -100


def rows_from_stream(
    tokens: torch.Tensor, doc_of: torch.Tensor, seq_len: int
) -> dict[str, torch.Tensor]:
    """tokens, doc_of [n_rows * seq_len + 1] -> {"input_ids", "labels", "doc_ids"} [n_rows, seq_len].

    doc_of is -1 on padding. doc_ids are renumbered from 0 inside every row (padding -1), so
    masks never depend on where a row sits in the corpus."""
    n_rows = (len(tokens) - 1) // seq_len
    inputs = tokens[:-1].view(n_rows, seq_len)
    targets = tokens[1:].view(n_rows, seq_len)
    doc_in = doc_of[:-1].view(n_rows, seq_len)
    doc_next = doc_of[1:].view(n_rows, seq_len)
    labels = targets.masked_fill((doc_in != doc_next) | (doc_next < 0), IGNORE_INDEX)
    local = doc_in - doc_in[:, :1]
    doc_ids = torch.where(doc_in < 0, torch.full_like(local, -1), local)
    return {
        "input_ids": inputs.contiguous(),
        "labels": labels.contiguous(),
        "doc_ids": doc_ids.contiguous(),
    }


def _lay_out(
    tokens: list[int],
    doc_of: list[int],
    doc: list[int],
    number: int,
    seq_len: int,
    pad_id: int,
    whole_documents: bool,
) -> None:
    """Append one document to a stream laid out in rows of seq_len (from tokens[0]); with
    `whole_documents`, pad to the next row first when it fits in a row but not in this one."""
    room = seq_len - len(tokens) % seq_len
    if whole_documents and room < len(doc) <= seq_len:
        tokens += [pad_id] * room
        doc_of += [-1] * room
    tokens += doc
    doc_of += [number] * len(doc)


def pack_documents(
    docs: list[list[int]], seq_len: int, pad_id: int, whole_documents: bool = False
) -> dict[str, torch.Tensor]:
    """-> {"input_ids", "labels", "doc_ids"}, each [N, seq_len] int64.

    Row r holds stream tokens r*seq_len .. (r+1)*seq_len - 1 and predicts the token after
    each; the last row is padded. With `whole_documents`, a document that fits in a row never
    straddles two: the row is padded and the document opens the next one (a retrieval
    document cut in two would separate its key from its question)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    tokens: list[int] = []
    doc_of: list[int] = []
    for number, doc in enumerate(docs):
        _lay_out(tokens, doc_of, doc, number, seq_len, pad_id, whole_documents)
    n_rows = max(1, -(-(len(tokens) - 1) // seq_len))
    pad = n_rows * seq_len + 1 - len(tokens)
    stream = torch.tensor(tokens + [pad_id] * pad, dtype=torch.int64)  # [n_rows * seq_len + 1]
    owner = torch.tensor(doc_of + [-1] * pad, dtype=torch.int64)
    return rows_from_stream(stream, owner, seq_len)


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a packed corpus; each item is a dict of [seq_len] tensors."""

    def __init__(
        self, docs: list[list[int]], seq_len: int, pad_id: int, whole_documents: bool = False
    ):
        self.rows = pack_documents(docs, seq_len, pad_id, whole_documents)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.rows.items()}


class StagedPackedStream(torch.utils.data.IterableDataset):
    """Endless packed training batches whose row length grows in stages (context extension).

    `stages` is [(first_step, seq_len), ...]. Every batch holds about `tokens_per_batch`
    tokens (tokens_per_batch // seq_len rows, at least one), so later stages train on longer,
    fewer rows. Documents are packed at the current stage's length as the stream reaches
    them; each pass over the corpus is shuffled with its own seed. `whole_documents` as in
    `pack_documents`. The stream position is a function of `step` alone (the batches before
    it are laid out again, without tensors), so setting `step` before iterating resumes
    exactly. Yields whole batches: use it with DataLoader(batch_size=None).
    """

    def __init__(
        self,
        docs: list[list[int]],
        stages: list[tuple[int, int]],
        tokens_per_batch: int,
        seed: int = 0,
        pad_id: int = 0,
        whole_documents: bool = False,
    ):
        stages = [(int(first), int(n)) for first, n in stages]
        if not stages or stages[0][0] != 0:
            raise ValueError(f"The first context stage must start at step 0, got {stages}.")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(stages)):
            raise ValueError(f"Context stages must start at increasing steps, got {stages}.")
        self.docs, self.stages, self.tokens_per_batch, self.seed = (
            docs,
            stages,
            tokens_per_batch,
            seed,
        )
        self.pad_id, self.whole_documents = pad_id, whole_documents
        self.step = 0

    def seq_len_at(self, step: int) -> int:
        return [n for first, n in self.stages if first <= step][-1]

    def rows_at(self, step: int) -> int:
        return max(1, self.tokens_per_batch // self.seq_len_at(step))

    def _documents(self):
        """(document number, tokens), pass after shuffled pass over the corpus."""
        number = 0
        for pass_index in itertools.count():
            order = list(range(len(self.docs)))
            random.Random(self.seed * 1_000_003 + pass_index).shuffle(order)
            for i in order:
                yield number, self.docs[i]
                number += 1

    def _layouts(self):
        """(seq_len, tokens, doc_of) of the batches at step 0, 1, ...: rows * seq_len + 1
        stream tokens each (the last is only a label; it opens the next batch)."""
        documents = self._documents()
        tokens: list[int] = []
        doc_of: list[int] = []
        for step in itertools.count():
            seq_len, rows = self.seq_len_at(step), self.rows_at(step)
            need = rows * seq_len + 1
            while len(tokens) < need:
                number, doc = next(documents)
                _lay_out(tokens, doc_of, doc, number, seq_len, self.pad_id, self.whole_documents)
            yield seq_len, tokens[:need], doc_of[:need]
            tokens, doc_of = tokens[rows * seq_len :], doc_of[rows * seq_len :]

    def __iter__(self):
        layouts = self._layouts()
        for _ in range(self.step):
            next(layouts)
        for seq_len, tokens, doc_of in layouts:
            yield rows_from_stream(
                torch.tensor(tokens, dtype=torch.int64),
                torch.tensor(doc_of, dtype=torch.int64),
                seq_len,
            )
            self.step += 1
