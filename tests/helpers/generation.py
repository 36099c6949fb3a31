"""What a fusion model's cached generation must equal: greedy decoding by recomputing the
whole sequence at every step, with the same placeholder tokens ruled out."""

from __future__ import annotations

import torch


def recomputed_greedy(model, prompt: torch.Tensor, n: int, **media) -> list[int]:
    """`n` greedy tokens after `prompt` [1, T0], the full forward pass run at each step."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(n):
            logits = model(tokens, **media)[:, -1]  # [1, V]
            logits[:, model.placeholder_ids()] = float("-inf")  # as generate does
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[0, prompt.shape[1] :].tolist()
