"""herd-plan: will a language run fit? Memory per device and FLOPs per step, without
allocating the model.

    herd-plan experiment=language_1b_8k                          # the composed herd-train config
    herd-plan experiment=long_context_1b_128k data.context_stages=null
    herd-plan model.llama.flavor=llama3_1_8b context=8k precision=bf16_mixed \\
        strategy=fsdp trainer.devices=8
    herd-plan --json ...                                          # one JSON object instead

It takes the same overrides as herd-train, builds the system under torch's FakeTensorMode
(shapes and dtypes, no storage), applies the run's activation checkpointing and precision,
and runs two optimizer steps of fake batches [data.batch_size, context.seq_len] through
torch's MemTracker, which follows every tensor's lifetime: the peak is what
`torch.cuda.max_memory_allocated` would report on one device, split into weights,
gradients, optimizer state and activations. Sharding (FSDP, DeepSpeed stage 2) divides the
states it shards by the device count and adds the gathered blocks it holds at a time (an
estimate; the single-device figure is measured). Rows are one document each (causal
attention): the [B, T, T] boolean mask of packed rows on CPU is stated apart, and
flex_attention's block mask on CUDA is small. Compiling is not simulated (it saves memory).
Checked against measured peaks in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from herd.errors import ConfigError
from herd.models.llama import Llama, LlamaConfig

GB = 1e9
# trainer.precision -> (dtype of the weights, autocast dtype or None)
PRECISIONS = {
    "32-true": (torch.float32, None),
    "32": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None),
    "16-true": (torch.float16, None),
    # Transformer Engine keeps fp32 weights and runs its layers in fp8/bf16: bf16 bounds it
    "transformer-engine": (torch.float32, torch.bfloat16),
}


@dataclass
class Plan:
    """One training run's memory per device (bytes) and compute per optimizer step."""

    flavor: str
    seq_len: int
    batch_size: int
    precision: str
    strategy: str
    devices: int
    checkpointing: str
    parameters: int
    trainable: int
    weights: float
    gradients: float
    optimizer_state: float
    activations: float  # at the moment of the peak, with the loss's buffers
    sharding_transient: float  # gathered shards (FSDP); 0 without sharding
    peak: float  # per device: the single-device peak, resharded, plus the transient
    packed_mask: float  # the SDPA path's [B, T, T] document mask of packed rows (CPU)
    step_flops: float  # per device and optimizer step (all micro-batches)

    def table(self) -> str:
        shard = f", {self.strategy} on {self.devices}" if self.devices > 1 else ""
        rows = [
            f"herd-plan: {self.flavor}, {self.batch_size} x {self.seq_len} tokens, "
            f"{self.precision}, checkpointing {self.checkpointing}{shard}",
            f"  parameters        {self.parameters:,} ({self.trainable:,} trained)",
            "  per device, held at the peak     GB",
            f"  weights          {self.weights / GB:7.2f}",
            f"  gradients        {self.gradients / GB:7.2f}",
            f"  optimizer state  {self.optimizer_state / GB:7.2f}",
            f"  activations      {self.activations / GB:7.2f}   (with the loss's buffers)",
        ]
        if self.sharding_transient:
            rows.append(f"  gathered shards  {self.sharding_transient / GB:7.2f}   (estimate)")
        rows.append(f"  peak             {self.peak / GB:7.2f}   (tensors; the allocator adds)")
        if self.packed_mask:
            rows.append(
                f"  + packed rows on CPU (SDPA's document mask): {self.packed_mask / GB:.2f}"
            )
        rows.append(f"  step             {self.step_flops / 1e12:,.1f} TFLOP per device")
        return "\n".join(rows)


def _strategy(cfg: DictConfig) -> tuple[str, int]:
    """(fsdp | deepspeed_stage_2 | ddp | single, devices) from the trainer config."""
    strategy = cfg.trainer.get("strategy", "auto")
    name = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy)
    devices = cfg.trainer.get("devices", 1)
    devices = int(devices) if str(devices).isdigit() else 1  # "auto": plan one device
    devices *= int(cfg.trainer.get("num_nodes", 1) or 1)
    if name.endswith("fsdp"):
        return "fsdp", devices
    if "deepspeed" in name:
        return "deepspeed_stage_2", devices
    if name.startswith("ddp"):
        return "ddp", devices
    return "single", devices


def _language_settings(cfg: DictConfig) -> tuple[LlamaConfig, dict]:
    """The run's decoder architecture and LanguageSystem settings, validated as herd-train
    would, without building anything."""
    from herd.data.tokenizer import load_tokenizer
    from herd.systems.language import llama_config
    from herd.systems.techniques import check_checkpointing_mode

    settings = OmegaConf.to_container(cfg.model, resolve=True)
    if not str(settings.get("_target_", "")).endswith("LanguageSystem"):
        raise ConfigError(
            f"herd-plan plans the language stage; model={settings.get('_target_')} is not "
            "one (the adapter stages train a few million parameters on frozen encoders)."
        )
    if settings.get("pretrained"):
        raise ConfigError(
            "herd-plan does not read pretrained checkpoints; plan their architecture with "
            "model.pretrained=null model.llama.flavor=<the checkpoint's flavor>."
        )
    check_checkpointing_mode(settings["activation_checkpointing"])
    vocab_size = load_tokenizer(settings["tokenizer"]).vocab_size
    return llama_config(settings["llama"], vocab_size), settings


def _gathered_bytes(model: Llama, compute_dtype: torch.dtype) -> float:
    """FSDP holds, besides its shards, the root unit (embeddings, output layer, final norm)
    and two decoder blocks (the one computing and the one prefetched) whole in the compute
    dtype, and during backward their gradients too."""
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(p.numel() for p in model.parameters()) - block * len(model.layers)
    size = torch.empty((), dtype=compute_dtype).element_size()
    return 2 * (root + 2 * block) * size


@dataclass
class LanguageRun:
    """What one language run allocates: the decoder, its optimizer and a batch of tokens,
    built in the current tensor mode (fake under herd-plan, real when measuring)."""

    model: Llama
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor  # [B, T]
    loss_chunk_size: int
    autocast_dtype: torch.dtype | None

    @classmethod
    def build(cls, cfg: DictConfig) -> LanguageRun:
        from herd.systems.common import build_optimization
        from herd.systems.techniques import apply_training_techniques

        weight_dtype, autocast_dtype = _precision(cfg)
        llama, settings = _language_settings(cfg)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(weight_dtype)  # fake modules cannot be cast after the fact
        try:
            model = Llama(llama)
        finally:
            torch.set_default_dtype(default_dtype)
        apply_training_techniques(model.layers, settings["activation_checkpointing"])
        optimizer = build_optimization(model, settings["optimizer"], None)["optimizer"]
        tokens = torch.zeros(int(cfg.data.batch_size), int(cfg.context.seq_len), dtype=torch.long)
        return cls(model, optimizer, tokens, settings["loss_chunk_size"], autocast_dtype)

    def micro_batch(self) -> None:
        """Forward, chunked loss and backward of one batch; gradients accumulate."""
        from herd.systems.losses import chunked_linear_cross_entropy

        B, T = self.tokens.shape
        autocast = (
            torch.autocast("cpu", dtype=self.autocast_dtype)
            if self.autocast_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            hidden = self.model.hidden_states(self.tokens)  # [B, T, D]
            loss = chunked_linear_cross_entropy(
                hidden.reshape(B * T, -1),
                self.model.lm_head.weight,
                self.tokens.reshape(-1),
                self.loss_chunk_size,
            )
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _precision(cfg: DictConfig) -> tuple[torch.dtype, torch.dtype | None]:
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"herd-plan does not know trainer.precision={precision!r}; use one of "
            f"{list(PRECISIONS)}."
        )
    return PRECISIONS[precision]


def plan(cfg: DictConfig) -> Plan:
    """Memory and FLOPs of the run `cfg` (a composed herd-train config) on each device."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    strategy, devices = _strategy(cfg)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    with FakeTensorMode():
        run = LanguageRun.build(cfg)
        tracker = MemTracker()
        tracker.track_external(run.model, run.optimizer)
        with tracker:
            for _ in range(2):  # the second step runs with the optimizer's state allocated
                for _ in range(min(accumulate, 2)):  # the second holds the first's gradients
                    run.micro_batch()
                    tracker.reset_mod_stats()  # per-module figures (unused) allow one pass
                run.optimizer_step()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        model = run.model
        parameters = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        compute_dtype = run.autocast_dtype or next(model.parameters()).dtype
        sharded = strategy == "fsdp" and devices > 1
        transient = _gathered_bytes(model, compute_dtype) if sharded else 0.0
    B, T = run.tokens.shape

    by_kind = {str(getattr(k, "value", k)): float(v) for k, v in peak.items()}
    weights, grads = by_kind["Parameter"] + by_kind["Buffer"], by_kind["Gradient"]
    optimizer_state = by_kind["Optstate"]
    # how many ways each state is split: (weights, gradients, optimizer state)
    split = {"fsdp": (devices,) * 3, "deepspeed_stage_2": (1, devices, devices)}
    per_weights, per_grads, per_opt = split.get(strategy, (1, 1, 1))
    states = weights / per_weights + grads / per_grads + optimizer_state / per_opt
    return Plan(
        flavor=model.config.flavor,
        seq_len=T,
        batch_size=B,
        precision=str(cfg.trainer.precision),
        strategy=strategy,
        devices=devices,
        checkpointing=cfg.model.activation_checkpointing,
        parameters=parameters,
        trainable=trainable,
        weights=weights / per_weights,
        gradients=grads / per_grads,
        optimizer_state=optimizer_state / per_opt,
        activations=by_kind["Activation"] + by_kind["Temp"] + by_kind["Other"],
        sharding_transient=transient,
        peak=by_kind["Total"] - (weights + grads + optimizer_state) + states + transient,
        packed_mask=float(B * T * T),
        step_flops=accumulate * model.config.batch_flops((B, T)),
    )


def main(argv: list[str] | None = None) -> int:
    from herd.train import compose_config
    from herd.utils.cli import quiet_library_noise, report_error

    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    as_json = "--json" in args
    overrides = [a for a in args if a != "--json"]
    quiet_library_noise()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = plan(compose_config("train", overrides, Path(tmp)))
    except Exception as exc:
        return report_error("herd-plan", exc)
    print(json.dumps(asdict(result)) if as_json else result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
