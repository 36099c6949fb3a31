"""Memory-lean causal-LM loss.

At long context the logits dwarf everything else (8192 tokens x 128256 vocab = 4.2 GB in
fp32), so the loss is computed from the final hidden states a chunk of tokens at a time,
and the gradients are computed in the same pass: each chunk's logits are turned into their
contributions to d(loss)/d(hidden) and d(loss)/d(weight) and freed at once. Backward then
only scales those two tensors, so at most one chunk of logits is ever alive and no matmul is
recomputed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from herd.data.packing import IGNORE_INDEX


def _chunk_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_valid: torch.Tensor,
    dtype,
    with_grad: bool,
    token_weights: torch.Tensor | None = None,
):
    """One chunk's elementwise work: logits [C, V], labels [C] -> (summed cross-entropy of its
    valid tokens, each times its weight [C] if given, d(mean loss)/d(logits) [C, V] in
    `dtype`, or None without `with_grad`). Its passes over [C, V] are what compiling fuses
    (the loss's share of a step that is not matmul)."""
    # bf16/fp16 logits are upcast: the softmax over a large vocabulary needs fp32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    share = (labels != IGNORE_INDEX).to(logits.dtype)  # [C]: 1 per labelled token, 0 else
    if token_weights is not None:
        share = share * token_weights
    target = labels.clamp(min=0)
    lse = logits.logsumexp(dim=-1)  # [C]
    target_logit = logits.gather(1, target[:, None]).squeeze(1)  # [C]
    loss_sum = ((lse - target_logit) * share).sum()
    if not with_grad:
        return loss_sum, None
    # d CE / d logits = softmax - onehot, for valid rows, over the token count
    grad_logits = (logits - lse[:, None]).exp_()  # [C, V], reuses no other buffer
    grad_logits[torch.arange(len(labels), device=labels.device), target] -= 1
    grad_logits *= (share / n_valid).to(grad_logits.dtype)[:, None]
    return loss_sum, grad_logits.to(dtype)


@functools.cache
def _compiled_chunk_terms():
    return torch.compile(_chunk_terms, dynamic=True)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of [token weight x] CE(hidden @ weight.T, labels) / n_valid,
    chunk by chunk."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, chunk_size: int, grad_enabled: bool, compiled: bool, weights
    ):
        # hidden [N, D], weight [V, D], labels [N], weights [N] or None. needs_input_grad
        # ignores no_grad(), so grad_enabled tells evaluation apart from training.
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        grad_hidden = torch.zeros_like(hidden) if want_h else None  # [N, D]
        grad_weight = torch.zeros_like(weight) if want_w else None  # [V, D]
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        terms = _compiled_chunk_terms() if compiled else _chunk_terms
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            logits = h @ weight.t()  # [C, V]
            w = None if weights is None else weights[start : start + chunk_size]
            loss_sum, grad_logits = terms(logits, y, n_valid, h.dtype, want_h or want_w, w)
            total = total + loss_sum
            if grad_logits is not None:
                if want_h:
                    grad_hidden[start : start + chunk_size] = grad_logits @ weight  # [C, D]
                if want_w:
                    grad_weight += grad_logits.t() @ h  # [V, D]
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_cross_entropy(
    hidden: torch.Tensor,  # [B, T, D] (or [N, D]) final-normed hidden states
    weight: torch.Tensor,  # [V, D] output projection
    labels: torch.Tensor,  # [B, T] (or [N]) target ids, IGNORE_INDEX where no loss
    chunk_size: int = 1024,
    compiled: bool = False,
    token_weights: torch.Tensor | None = None,  # [B, T] (or [N]): each token's share
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy and the number of counted tokens, without a [B, T, V] tensor.
    With `token_weights`, each token's cross-entropy is multiplied by its weight before the
    mean (still over the count of labelled tokens, so weights of 1 change nothing).
    `compiled`: each chunk's elementwise work through torch.compile (with model.compile)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
    labels = labels.reshape(-1)  # [N]
    if token_weights is not None:
        token_weights = token_weights.reshape(-1).to(torch.float32)  # [N]
    valid = labels != IGNORE_INDEX
    n_tokens = valid.sum()
    if n_tokens < labels.numel():
        # Rows without a target (prompts, padding: most of a fine-tuning batch) get no
        # logits at all. Costs one host sync; fully labelled pre-training batches skip it.
        hidden, labels = hidden[valid], labels[valid]  # [N', D], [N']
        if token_weights is not None:
            token_weights = token_weights[valid]
    loss = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels, chunk_size, torch.is_grad_enabled(), compiled, token_weights
    )
    return loss, n_tokens


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,  # [N, D]
    weight: torch.Tensor,  # [V, D]
    labels: torch.Tensor,  # [N]
    chunk_size: int = 1024,
    compiled: bool = False,
) -> torch.Tensor:
    """The mean over labelled tokens, every row computed (no host sync: what herd-plan runs
    on fake tensors, whose labels cannot be read)."""
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels, chunk_size, torch.is_grad_enabled(), compiled, None
    )


def embedding_ctc_loss(
    embeddings: torch.Tensor,  # [M, L, D] one sequence of embeddings per clip
    lengths: torch.Tensor,  # [M] real embeddings of each
    targets: list[list[int]],  # M lists of token ids (none equal to `blank`)
    table: torch.Tensor,  # [V, D] the token embeddings they are classified against
    blank: int,  # the row of `table` that stands for "no new token here"
    temperature: float,
) -> torch.Tensor:
    """CTC of each sequence of embeddings against its token ids, every embedding classified
    over the rows of `table` by cosine similarity / `temperature`: what a speech adapter is
    trained with to put each spoken word's token where the word is said. Mean over the
    sequences of the loss per target token, as the speech stage's CTC."""
    unit = F.normalize(embeddings.float(), dim=-1)  # [M, L, D]
    logits = unit @ F.normalize(table.float(), dim=-1).T / temperature  # [M, L, V]
    flat = torch.tensor([t for ids in targets for t in ids], device=embeddings.device)
    target_lengths = torch.tensor([len(ids) for ids in targets], device=embeddings.device)
    return F.ctc_loss(
        logits.log_softmax(dim=-1).transpose(0, 1),  # [L, M, V]: ctc_loss's layout
        flat,
        lengths,
        target_lengths,
        blank=blank,
        reduction="mean",
        zero_infinity=True,  # a clip too short for its transcript gives no gradient, not NaN
    )
