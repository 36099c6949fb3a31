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


def module_parts(
    sizes: dict[str, int], subset: set[str] | None = None
) -> tuple[dict[str, int], dict[str, str]]:
    """{parameter name: numel} summed into readable parts: the module path up to its first
    layer index, else its first two names, with the indices of otherwise equal paths merged
    into ranges (`decoder.layers.0-5`) and LoRA matrices kept apart from the weights they
    adapt (`decoder.layers.0-5 (LoRA)`). A first name that every parameter shares (a
    system's `model.`) is left out.

    Parts are named from all of `sizes`; with `subset` (e.g. the names the optimizer holds)
    only its parameters are counted, so the counts line up with the whole model's parts.
    Returns ({part: parameters}, {part: the layer indices counted, where only some are,
    e.g. '4-5'})."""
    heads = {name.split(".", 1)[0] for name in sizes}
    shared = len(heads) == 1 and all("." in name for name in sizes)  # a system's `model.`
    groups: dict[tuple[str, str], set[int]] = {}
    where: dict[str, tuple[tuple[str, str], int | None]] = {}
    for name in sizes:
        names = name.split(".")[1:] if shared else name.split(".")
        index = next((i for i, n in enumerate(names[:-1]) if n.isdigit()), None)
        path = names[:index] if index is not None else names[: min(2, len(names) - 1) or 1]
        tag = " (LoRA)" if any(n.startswith("lora_") for n in names) else ""
        layer = int(names[index]) if index is not None else None
        where[name] = ((".".join(path), tag), layer)
        groups.setdefault(where[name][0], set()).update([] if layer is None else [layer])
    labels = {
        key: key[0] + (f".{index_ranges(sorted(layers))}" if layers else "") + key[1]
        for key, layers in sorted(groups.items())
    }
    counts: dict[str, int] = {}
    counted_layers: dict[str, set[int]] = {}
    for name in sorted(sizes if subset is None else subset & set(sizes)):
        key, layer = where[name]
        counts[labels[key]] = counts.get(labels[key], 0) + sizes[name]
        counted_layers.setdefault(labels[key], set()).update([] if layer is None else [layer])
    parts = {label: counts[label] for label in labels.values() if label in counts}
    some_layers = {
        labels[key]: index_ranges(sorted(counted_layers[labels[key]]))
        for key, layers in groups.items()
        if labels[key] in counted_layers and counted_layers[labels[key]] != layers
    }
    return parts, some_layers


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def cell(summary: dict, part: str, side: str) -> str:
    """A part's count on one side ("optimizer" or "gradients"), with the layers where only
    some are counted: '1,508,352 (layers 4-5)'; '—' for none."""
    count = (summary.get(side) or {}).get(part)
    if not count:
        return "—"
    layers = (summary.get(f"{side}_layers") or {}).get(part)
    return f"{count:,}" + (f" (layers {layers})" if layers else "")


def markdown(summary: dict) -> str:
    rows = [
        "| part | parameters | in the optimizer | received a gradient |",
        "|---|---|---|---|",
    ]
    for part, numel in summary["all"].items():
        rows.append(
            f"| {part} | {numel:,} | {cell(summary, part, 'optimizer')} | "
            f"{cell(summary, part, 'gradients')} |"
        )
    return "\n".join(rows)


class TrainedParameters(L.Callback):
    """At fit start: the parameters the optimizers hold; over every step of the run: those
    that received a gradient (a batch without images leaves the image side without one, so
    one step would not do). Both summed per module part (see `module_parts`), written when
    training ends."""

    def __init__(self) -> None:
        self.summary: dict | None = None
        self._sizes: dict[str, int] = {}
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
        self._sizes = {n: p.numel() for n, p in named.items()}
        optimizer, optimizer_layers = module_parts(self._sizes, in_optimizer)
        self.summary = {
            "all": module_parts(self._sizes)[0],
            "optimizer": optimizer,
            "optimizer_layers": optimizer_layers,
            "optimizer_total": sum(self._sizes[n] for n in in_optimizer),
        }
        self._with_grad = set()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._with_grad.update(n for n, p in pl_module.named_parameters() if p.grad is not None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.summary is None:
            return
        with_grad = self._with_grad & set(self._sizes)
        self.summary["gradients"], self.summary["gradients_layers"] = module_parts(
            self._sizes, with_grad
        )
        self.summary["gradients_total"] = sum(self._sizes[n] for n in with_grad)
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
