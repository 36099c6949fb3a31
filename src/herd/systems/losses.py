"""Memory-lean causal-LM loss.

At long context the logits dwarf everything else (8192 tokens x 128256 vocab = 4.2 GB in
fp32), so the loss is computed from the final hidden states a chunk of tokens at a time.
Each chunk runs under activation checkpointing: its logits are freed after the forward and
recomputed during backward, so at most one chunk of logits is alive at any moment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = hidden @ weight.t()  # [C, V]
    # bf16/fp16 logits are upcast: the softmax over a large vocabulary needs fp32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor,  # [B, T, D] (or [N, D]) final-normed hidden states
    weight: torch.Tensor,  # [V, D] output projection
    labels: torch.Tensor,  # [B, T] (or [N]) target ids, IGNORE_INDEX where no loss
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy and the number of counted tokens, without a [B, T, V] tensor."""
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    labels = labels.reshape(-1)  # [N]
    n_tokens = (labels != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y)
    return total / n_tokens.clamp(min=1), n_tokens
