"""Activation checkpointing and compile change speed and memory, never results or names."""

from __future__ import annotations

import pytest
import torch

from herd.errors import ConfigError
from herd.models.llama import Llama, LlamaConfig
from herd.systems.losses import chunked_cross_entropy
from herd.systems.techniques import apply_training_techniques


def loss_and_grads(mode: str, compile: bool = False):
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_flavor("tiny"))
    apply_training_techniques(model.layers, mode, compile)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 30 + [1] * 34, [0] * 64])
    hidden = model.hidden_states(tokens[:, :-1], doc_ids=doc_ids[:, :-1])
    loss, _ = chunked_cross_entropy(hidden, model.lm_head.weight, tokens[:, 1:], chunk_size=40)
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["attention", "selective", "full"])
def test_checkpointing_gives_the_same_loss_and_gradients(mode):
    base_model, base_loss, base_grads = loss_and_grads("none")
    model, loss, grads = loss_and_grads(mode)
    assert loss == base_loss
    assert grads.keys() == base_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], base_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert model.state_dict().keys() == base_model.state_dict().keys()


def test_each_checkpointing_mode_saves_fewer_activations_than_the_one_before():
    def saved_elements(mode):
        torch.manual_seed(0)
        model = Llama(LlamaConfig.from_flavor("tiny"))
        apply_training_techniques(model.layers, mode)
        count = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: count.append(t.numel()) or t, lambda t: t
        ):
            model.hidden_states(torch.randint(0, 512, (2, 128))).sum()
        return sum(count)

    saved = {mode: saved_elements(mode) for mode in ("none", "selective", "attention", "full")}
    assert saved["selective"] < 0.5 * saved["none"]
    assert saved["attention"] < 0.5 * saved["selective"]  # the matmul outputs are recomputed
    assert saved["full"] < saved["attention"]  # attention's outputs too


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="activation_checkpointing='some' is unknown"):
        apply_training_techniques(torch.nn.ModuleList(), "some")
