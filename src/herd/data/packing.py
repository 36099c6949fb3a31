"""Packing tokenised documents into fixed-length training rows.

Documents are laid end to end in one stream (each as <|begin_of_text|> ... <|end_of_text|>)
and cut into rows of `seq_len` inputs with their next-token labels. Each row keeps the id of
the document every token came from, so attention can stay inside documents and RoPE
positions can restart at each one. A label that would predict across a document boundary
is ignored.
"""

from __future__ import annotations

import torch

from herd.systems.losses import IGNORE_INDEX


def pack_documents(docs: list[list[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """-> {"input_ids", "labels", "doc_ids"}, each [N, seq_len] int64.

    Row r holds stream tokens r*seq_len .. (r+1)*seq_len - 1 and predicts the token after
    each. doc_ids are renumbered from 0 inside every row; padding has doc id -1.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    stream = torch.tensor([t for d in docs for t in d], dtype=torch.int64)  # [L]
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), lengths)  # [L]
    n_rows = max(1, -(-(len(stream) - 1) // seq_len))
    total = n_rows * seq_len + 1
    pad = total - len(stream)
    stream = torch.cat([stream, torch.full((pad,), pad_id, dtype=torch.int64)])
    doc_of = torch.cat([doc_of, torch.full((pad,), -1, dtype=torch.int64)])

    inputs = stream[:-1].view(n_rows, seq_len)
    targets = stream[1:].view(n_rows, seq_len)
    doc_in = doc_of[:-1].view(n_rows, seq_len)
    doc_next = doc_of[1:].view(n_rows, seq_len)
    labels = targets.masked_fill((doc_in != doc_next) | (doc_next < 0), IGNORE_INDEX)
    # Local ids 0, 1, ... per row (padding stays -1) so masks never depend on corpus size.
    local = doc_in - doc_in[:, :1]
    doc_ids = torch.where(doc_in < 0, torch.full_like(local, -1), local)
    return {
        "input_ids": inputs.contiguous(),
        "labels": labels.contiguous(),
        "doc_ids": doc_ids.contiguous(),
    }


class PackedDataset(torch.utils.data.Dataset):
    """Rows of a packed corpus; each item is a dict of [seq_len] tensors."""

    def __init__(self, docs: list[list[int]], seq_len: int, pad_id: int):
        self.rows = pack_documents(docs, seq_len, pad_id)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.rows.items()}
