"""Chunked cross-entropy equals the full one, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.systems.losses import IGNORE_INDEX, chunked_cross_entropy


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 37))
    labels[0, :5] = IGNORE_INDEX
    labels[2, -3:] = IGNORE_INDEX

    full = F.cross_entropy(
        (hidden @ weight.t()).view(-1, 50), labels.view(-1), ignore_index=IGNORE_INDEX
    )
    g_hidden, g_weight = torch.autograd.grad(full, (hidden, weight))

    chunked, n_tokens = chunked_cross_entropy(hidden, weight, labels, chunk_size)
    c_hidden, c_weight = torch.autograd.grad(chunked, (hidden, weight))

    assert n_tokens == (labels != IGNORE_INDEX).sum()
    assert abs(chunked.item() - full.item()) < 1e-6
    torch.testing.assert_close(c_hidden, g_hidden, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_weight, g_weight, atol=1e-6, rtol=1e-6)


def test_token_weights_scale_each_tokens_term_of_the_mean_over_labelled_tokens():
    torch.manual_seed(2)
    hidden = torch.randn(2, 21, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 21))
    labels[:, :4] = IGNORE_INDEX
    token_weights = torch.ones(2, 21)
    token_weights[1] = 4.0  # e.g. every token of the second sample's task counts four times

    per_token = F.cross_entropy(
        (hidden @ weight.t()).view(-1, 30),
        labels.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    n_valid = (labels != IGNORE_INDEX).sum()
    expected = (per_token * token_weights.view(-1).double()).sum() / n_valid
    e_hidden, e_weight = torch.autograd.grad(expected, (hidden, weight))

    weighted, n_tokens = chunked_cross_entropy(
        hidden, weight, labels, 5, token_weights=token_weights
    )
    w_hidden, w_weight = torch.autograd.grad(weighted, (hidden, weight))

    assert n_tokens == n_valid
    assert abs(weighted.item() - expected.item()) < 1e-9
    torch.testing.assert_close(w_hidden, e_hidden)
    torch.testing.assert_close(w_weight, e_weight)
    plain, _ = chunked_cross_entropy(hidden, weight, labels, 5)
    assert weighted.item() > plain.item() * 1.5  # the weights are not ignored


def test_chunked_loss_fp32_within_1e6():
    torch.manual_seed(1)
    hidden = torch.randn(2, 300, 32)
    weight = torch.randn(1000, 32) * 0.1
    labels = torch.randint(0, 1000, (2, 300))
    full = F.cross_entropy((hidden @ weight.t()).view(-1, 1000), labels.view(-1))
    chunked, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=128)
    assert abs(chunked.item() - full.item()) < 1e-6


def test_no_full_logits_tensor_is_kept_for_backward():
    """Saved activations stay at one chunk of logits, not [N, V]."""
    hidden = torch.randn(4096, 8, requires_grad=True)
    weight = torch.randn(2000, 8, requires_grad=True)
    labels = torch.randint(0, 2000, (4096,))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_size=256)
    # Without chunk checkpointing the chunks' logits alone would add up to 8.2M saved elements.
    assert sum(saved) < 4096 * 2000 / 8
    loss.backward()
    assert hidden.grad is not None and weight.grad is not None


def test_the_compiled_loss_equals_the_eager_one():
    """model.compile also compiles each chunk's softmax and gradient passes: same numbers."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = IGNORE_INDEX
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, n = chunked_cross_entropy(h, w, labels, chunk_size=16, compiled=compiled)
        loss.backward()
        results.append((loss.detach(), n, h.grad, w.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_embedding_ctc_rewards_embeddings_on_their_tokens_rows_in_order():
    """Embeddings that point at the rows of their clip's tokens, in order and with blanks
    between repeats, score near 0; the same rows out of order score high; the value is
    CTC's over the cosine-similarity logits."""
    from herd.systems.losses import embedding_ctc_loss

    torch.manual_seed(0)
    table = torch.randn(20, 32)
    blank, targets = 19, [[3, 5, 5, 7], [2]]
    lengths = torch.tensor([8, 2])
    in_order = [[blank, 3, 3, blank, 5, blank, 5, 7], [2, blank, 0, 0, 0, 0, 0, 0]]
    out_of_order = [[blank, 7, 5, blank, 5, blank, 3, 3], in_order[1]]
    embeddings = table[torch.tensor(in_order)] * 3.0  # the norm does not count, the direction does
    aligned = embedding_ctc_loss(embeddings, lengths, targets, table, blank, temperature=0.1)
    shuffled = table[torch.tensor(out_of_order)]
    misaligned = embedding_ctc_loss(shuffled, lengths, targets, table, blank, temperature=0.1)
    assert aligned < 0.05 and misaligned > 2.0, (aligned, misaligned)

    logits = F.normalize(embeddings, dim=-1) @ F.normalize(table, dim=-1).T / 0.1  # [M, L, V]
    expected = F.ctc_loss(
        logits.log_softmax(-1).transpose(0, 1),
        torch.tensor([3, 5, 5, 7, 2]),
        lengths,
        torch.tensor([4, 1]),
        blank=blank,
    )
    assert aligned.item() == pytest.approx(expected.item(), rel=1e-5)
