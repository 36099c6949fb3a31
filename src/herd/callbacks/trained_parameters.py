"""Which parameters a run actually trains, read from what trains them (the optimizer's
parameter groups and the gradients its steps computed), not from the config: a frozen-LM
recipe that silently trains the LM, or an adapter the optimizer never received, shows here.

Written to `trained_parameters.json` in the run directory and as a table under
`model/trained_parameters` in TensorBoard's Text tab; `herd-report` lists it per setting.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L

FILE = "trained_parameters.json"


def module_parts(sizes: dict[str, int]) -> dict[str, int]:
    """{parameter name: numel} summed into readable parts: the module path up to its first
    layer index (`decoder.layers.3`), else its first two names, with the indices of
    otherwise equal paths merged into ranges (`decoder.layers.4-5`) and LoRA matrices kept
    apart from the weights they adapt (`decoder.layers.0-5 (LoRA)`). A first name that every
    parameter shares (a system's `model.`) is left out."""
    grouped: dict[tuple[str, str], dict[int | None, int]] = {}
    heads = {name.split(".", 1)[0] for name in sizes}
    shared = len(heads) == 1 and all("." in name for name in sizes)  # a system's `model.`
    for name, numel in sizes.items():
        names = name.split(".")[1:] if shared else name.split(".")
        index = next((i for i, n in enumerate(names[:-1]) if n.isdigit()), None)
        path = names[:index] if index is not None else names[: min(2, len(names) - 1) or 1]
        tag = " (LoRA)" if any(n.startswith("lora_") for n in names) else ""
        slot = grouped.setdefault((".".join(path), tag), {})
        layer = int(names[index]) if index is not None else None
        slot[layer] = slot.get(layer, 0) + numel
    parts = {}
    for (path, tag), layers in sorted(grouped.items()):
        indices = sorted(i for i in layers if i is not None)
        label = path + (f".{index_ranges(indices)}" if indices else "") + tag
        parts[label] = sum(layers.values())
    return parts


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def markdown(summary: dict) -> str:
    rows = [
        "| part | parameters | in the optimizer | received a gradient |",
        "|---|---|---|---|",
    ]
    for part, numel in summary["all"].items():
        in_opt = summary["optimizer"].get(part, 0)
        grads = summary["gradients"].get(part) if summary["gradients"] is not None else None
        rows.append(
            f"| {part} | {numel:,} | {in_opt:,} | {'—' if grads is None else f'{grads:,}'} |"
        )
    return "\n".join(rows)


class TrainedParameters(L.Callback):
    """At fit start: the parameters the optimizers hold; over every step of the run: those
    that received a gradient (a batch without images leaves the image side without one, so
    one step would not do). Both summed per module part (see `module_parts`), written when
    training ends."""

    def __init__(self) -> None:
        self.summary: dict | None = None
        self._with_grad: set[str] = set()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(pl_module.named_parameters())
        names = {id(p): n for n, p in named.items()}
        in_optimizer = {
            names[id(p)]
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            for p in group["params"]
            if id(p) in names  # a strategy may have wrapped or flattened parameters
        }
        self.summary = {
            "all": module_parts({n: p.numel() for n, p in named.items()}),
            "optimizer": module_parts({n: named[n].numel() for n in in_optimizer}),
            "optimizer_total": sum(named[n].numel() for n in in_optimizer),
        }
        self._with_grad = set()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._with_grad.update(n for n, p in pl_module.named_parameters() if p.grad is not None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.summary is None:
            return
        named = dict(pl_module.named_parameters())
        grads = {n: named[n].numel() for n in self._with_grad if n in named}
        self.summary["gradients"] = module_parts(grads)
        self.summary["gradients_total"] = sum(grads.values())
        self.summary["steps"] = trainer.global_step
        path = Path(trainer.default_root_dir) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.summary, indent=2) + "\n")
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("model/trained_parameters", markdown(self.summary), 0)


def read_summary(run_dir: Path) -> dict | None:
    """A run's trained_parameters.json, or None where it has none or it is unreadable."""
    try:
        summary = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "optimizer" in summary else None
