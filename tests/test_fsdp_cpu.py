"""strategy=fsdp's sharding, run on 2 CPU processes (gloo) since Lightning allows FSDP on CUDA
only: the tiny Llama wrapped as herd's strategy wraps it (activation checkpointing "full" on
each decoder block, then one FULL_SHARD unit per DecoderLayer inside a root unit that runs the
loss, as Lightning's FSDP wraps the LightningModule) trains like one process on the whole
batch, resumes bit for bit from a sharded checkpoint, and gathers a state dict that a plain
Llama loads."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from herd.models.llama import DecoderLayer, Llama, LlamaConfig, rope_inverse_frequencies
from herd.systems.losses import chunked_cross_entropy
from herd.systems.techniques import apply_training_techniques

WORLD_SIZE = 2
CHUNK_SIZE = 24  # loss chunks of 24 tokens: each rank's 2 x 31 tokens span three
LR = 1e-2
# Adam's eps far above the gradients' rounding differences (up to 1e-8 between a batch and the
# mean of its two halves), which then move a parameter by at most LR x 1e-8 / eps = 1e-6. With
# the default 1e-8 an element whose gradient is ~0 takes that noise for a step of up to LR,
# and gradients twice too large would go unseen (Adam's steps ignore the gradients' scale).
ADAM_EPS = 1e-4


class Root(nn.Module):
    """What Lightning's FSDP wraps as the root unit: a module that holds the decoder as
    `model` (LanguageSystem.model) and runs the step in its forward, so that the root's own
    parameters (embedding, final norm, output layer) are gathered while the loss reads
    `model.lm_head.weight` (LanguageSystem.loss)."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.model = Llama(LlamaConfig.from_flavor("tiny"))
        apply_training_techniques(self.model.layers, "full")  # LanguageSystem.configure_model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> the mean token loss against labels [B, T], or logits [B, T, V]."""
        if labels is None:
            return self.model(tokens)
        hidden = self.model.hidden_states(tokens)  # [B, T, D]
        loss, _ = chunked_cross_entropy(hidden, self.model.lm_head.weight, labels, CHUNK_SIZE)
        return loss


def batches() -> list[torch.Tensor]:
    """Two fixed batches of token rows [4, 32]: inputs are [:, :-1], labels [:, 1:]."""
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (4, 32), generator=generator) for _ in range(2)]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, rows: torch.Tensor):
    """One AdamW step on rows [B, T+1]; returns the loss before it."""
    loss = model(rows[:, :-1], rows[:, 1:])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def wrap(model: nn.Module, mixed_precision: MixedPrecision | None = None) -> nn.Module:
    """Wrapped like herd.utils.strategies.fsdp (through Lightning's FSDPStrategy: FSDP1,
    use_orig_params, one unit per DecoderLayer)."""
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({DecoderLayer}),
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
        device_id=torch.device("cpu"),
        mixed_precision=mixed_precision,
    )


def sharded(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A freshly built, wrapped model and its optimizer over the local shards."""
    model = wrap(Root(seed))
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The gathered state dict (on rank 0; empty on the others)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def worker(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 processes on as few cores
    # torch.distributed's own notices (FSDP1's sharded state dicts are ShardedTensors, which
    # it deprecates); pytest's filters do not reach spawned processes
    warnings.filterwarnings("ignore", module=r"torch\.distributed")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        half = slice(2 * rank, 2 * rank + 2)  # this rank's 2 of the 4 rows
        first, second = (rows[half] for rows in batches())

        model, optimizer = sharded(seed=0)
        losses = [train_step(model, optimizer, first)]
        model_sd, optim_sd = get_state_dict(model, optimizer)  # this rank's shards
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=out / "step1")
        losses.append(train_step(model, optimizer, second))
        for loss in losses:  # each rank's loss is its half's mean; the batch's is their mean
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        after_step2 = full_state(model)
        model.eval()
        with torch.no_grad():
            logits = model(first[:, :-1])  # [2, 31, V]

        # A different init, so that only the checkpoint can make it agree.
        resumed, resumed_optimizer = sharded(seed=1)
        model_sd, optim_sd = get_state_dict(resumed, resumed_optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=out / "step1")
        set_state_dict(
            resumed, resumed_optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd
        )
        train_step(resumed, resumed_optimizer, second)
        resumed_after_step2 = full_state(resumed)

        # Lightning's precision=bf16_true under FSDP: MixedPrecision casts every buffer to
        # bf16 in place, which must not reach the RoPE frequencies.
        bf16 = MixedPrecision(torch.bfloat16, torch.bfloat16, torch.bfloat16)
        mixed = wrap(Root(seed=0), bf16)
        with torch.no_grad():
            mixed(first[:, :-1])
        rope_under_bf16 = mixed.module.model.rope.inv_freq
        if rank == 0:
            torch.save(
                {
                    "losses": torch.stack(losses),
                    "after_step2": after_step2,
                    "resumed_after_step2": resumed_after_step2,
                    "tokens": first[:, :-1],
                    "logits": logits,
                    "rope_under_bf16": rope_under_bf16,
                },
                out / "rank0.pt",
            )
        dist.barrier()  # neither rank tears gloo down while the other still uses it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_resumes_and_gathers_like_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), tmp_path), nprocs=WORLD_SIZE, join=True)
    sharded_run = torch.load(tmp_path / "rank0.pt", weights_only=True)

    # One process, the whole batch: AdamW on the mean over all its tokens, which is what
    # FSDP's averaging of the ranks' half-batch gradients amounts to (every token counts).
    reference = Root(seed=0)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    losses = torch.stack([train_step(reference, optimizer, rows) for rows in batches()])
    torch.testing.assert_close(sharded_run["losses"], losses, rtol=1e-5, atol=1e-6)

    # Parameter names survive sharding: the gathered state dict is the plain model's.
    after_step2 = sharded_run["after_step2"]
    assert after_step2.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(after_step2[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # Resuming from the sharded checkpoint of step 1 repeats step 2 bit for bit.
    resumed = sharded_run["resumed_after_step2"]
    assert resumed.keys() == after_step2.keys()
    for name, value in after_step2.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)

    # RoPE runs on the fp32 frequencies under bf16 MixedPrecision (a bf16 frequency is off
    # by radians at position 8000).
    cfg = LlamaConfig.from_flavor("tiny")
    expected = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert sharded_run["rope_under_bf16"].dtype == torch.float32
    assert torch.equal(sharded_run["rope_under_bf16"], expected)

    # The gathered weights in a plain, unwrapped Llama give the sharded model's logits.
    plain = Llama(LlamaConfig.from_flavor("tiny")).eval()
    plain.load_state_dict({k.removeprefix("model."): v for k, v in after_step2.items()})
    with torch.no_grad():
        logits = plain(sharded_run["tokens"])  # [2, 31, V]
    torch.testing.assert_close(logits, sharded_run["logits"], rtol=1e-5, atol=1e-6)
