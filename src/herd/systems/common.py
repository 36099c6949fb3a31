"""Training plumbing shared by the stage systems."""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

import herd
from herd.errors import ConfigError

# strategies whose parameters hold full gradients on every rank after the backward
_UNSHARDED = (SingleDeviceStrategy, DDPStrategy)


def decay_param_groups(
    module: nn.Module, weight_decay: float, lr_multipliers: dict[str, float] | None = None
) -> list[dict]:
    """Weight decay on matrices only; norms, gains and biases are not decayed.
    `lr_multipliers` {glob pattern of parameter names: factor} puts the matching parameters
    (first matching pattern wins) in groups of their own with a scaled learning rate."""
    patterns = list((lr_multipliers or {}).items())
    groups: dict[tuple[float, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for pattern, f in patterns if fnmatch.fnmatchcase(name, pattern)), 1.0)
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    out = []
    for (scale, decayed), params in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != 1.0, not kv[0][1])
    ):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if scale != 1.0:
            group["lr_scale"] = scale
        out.append(group)
    return out


def build_optimization(
    module,
    optimizer_cfg: dict,
    scheduler_cfg: dict | None,
    lr_multipliers: dict[str, float] | None = None,
    total_steps: int | None = None,
) -> dict:
    """Instantiate a `_partial_` optimizer over `module`'s trainable parameters and an optional
    `_partial_` per-step scheduler that receives the run's total step count (by default the
    trainer's; a loop without a Lightning trainer passes its own)."""
    optimizer_cfg = dict(optimizer_cfg)
    weight_decay = optimizer_cfg.pop("weight_decay", 0.0)
    groups = decay_param_groups(module, weight_decay, lr_multipliers)
    optimizer = hydra.utils.instantiate(optimizer_cfg)(groups)
    for group in optimizer.param_groups:  # scale after the optimizer has set each group's lr
        group["lr"] *= group.pop("lr_scale", 1.0)
    # A fused optimizer offers to unscale fp16 gradients itself, and Lightning then refuses
    # gradient clipping under any mixed precision, bf16 (which scales nothing) included. The
    # ordinary path (the scaler unscales, then the step) is exact for it too.
    optimizer._step_supports_amp_scaling = False
    if not scheduler_cfg:
        return {"optimizer": optimizer}
    if total_steps is None:
        total_steps = int(module.trainer.estimated_stepping_batches)
    scheduler = hydra.utils.instantiate(scheduler_cfg)(optimizer, total_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode inside the block, back in the mode it had afterwards (samples
    and predictions drawn in the middle of training must not leave it in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def grad_norm(module: nn.Module) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def step_grad_norm(module: L.LightningModule) -> torch.Tensor:
    """The total gradient norm of the current optimizer step, computed once and shared by
    everything that reads it in that step (the non-finite guard, the train/grad_norm log,
    gradient clipping)."""
    step = module.trainer.global_step
    cached = module.__dict__.get("_grad_norm_of_step")
    if cached is None or cached[0] != step:
        cached = (step, grad_norm(module))
        module.__dict__["_grad_norm_of_step"] = cached
    return cached[1]


class HerdSystem(L.LightningModule):
    """Base of the stage systems: checkpoints record which system wrote them, so
    `load_system` (and herd-eval) can reopen any of them from the path alone, and the run
    that wrote them (resolved config, data config, git revision) when herd-train set
    `provenance`.

    It also holds the plumbing every stage shares: a system implements
    `_eval_step(batch, split)` (accumulate metrics) and `_log_eval(split)` (log and reset
    them), may scale learning rates by parameter name with `lr_multipliers()`, and keeps
    its optimiser and scheduler configs in `hparams.optimizer` / `hparams.scheduler`."""

    # {"config": resolved run config, "data": the data config with its interpolations,
    #  "git": revision}; plain containers only, so checkpoints load with weights_only=True
    provenance: dict | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        cls = type(self)
        checkpoint["herd"] = {
            "version": herd.__version__,
            "system": f"{cls.__module__}.{cls.__qualname__}",
            **(self.provenance or {}),
        }

    def _eval_step(self, batch, split: str):
        raise NotImplementedError

    def _log_eval(self, split: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int):
        return self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("train/grad_norm", step_grad_norm(self), on_step=True, on_epoch=False)
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clips by the step's shared norm instead of computing it again. Sharded strategies
        (FSDP, DeepSpeed) hold local gradient shards only; they clip the usual way."""
        by_norm = gradient_clip_algorithm in (None, "norm")
        if (
            not gradient_clip_val
            or not by_norm
            or not isinstance(self.trainer.strategy, _UNSHARDED)
        ):
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, step_grad_norm(self))

    def lr_multipliers(self) -> dict[str, float]:
        """{glob pattern of parameter names: learning-rate factor} (see decay_param_groups)."""
        return {}

    def configure_optimizers(self):
        hp = self.hparams
        return build_optimization(self, hp.optimizer, hp.scheduler, self.lr_multipliers())


def read_checkpoint_header(path: str | Path) -> dict:
    """The `herd` entry of a checkpoint (memory-mapped; the weights are not read)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Checkpoint {path} does not exist; pass ckpt_path=PATH/TO/last.ckpt.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConfigError(
            f"Checkpoint {path} could not be read ({type(exc).__name__}): {exc}"
        ) from exc
    header = state.get("herd") if isinstance(state, dict) else None
    if not isinstance(header, dict) or not str(header.get("system", "")).startswith(
        "herd.systems."
    ):
        raise ConfigError(f"Checkpoint {path} was not written by a herd system (no 'herd' entry).")
    return header


def load_system(path: str | Path, map_location: str = "cpu") -> HerdSystem:
    """Reopen a herd checkpoint as the system that wrote it (weights-only unpickling)."""
    module_name, cls_name = read_checkpoint_header(path)["system"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=True)
