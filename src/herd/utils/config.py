"""Config values as plain Python."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, so hyper-parameters saved in checkpoints
    load with torch.load(weights_only=True)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def sweep_choices(overrides: list[str]) -> list[tuple[str, list[str]]] | None:
    """Command-line overrides as Hydra's basic sweeper expands them: [(key, [key=value,
    ...])] in the order written, one value for a plain override, each value of a sweep
    (`lr=0.1,0.3`, `range(1,4)`). None when they do not parse or hold an interval sweep,
    which the basic sweeper cannot run."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        choices = []
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices.append((key, [f"{key}={override.get_value_element_as_str()}"]))
            elif override.is_discrete_sweep():
                choices.append((key, [f"{key}={v}" for v in override.sweep_string_iterator()]))
            else:
                return None
    except Exception:  # Hydra's parser raises several types; a listing it rejects is unknown
        return None
    return choices


def swept_keys(sweep_dir) -> list[str]:
    """The keys a multirun varies (more than one value), in the order written, from the
    listing Hydra keeps in its sweep directory (multirun.yaml: command-line overrides and
    the sweeper's params); [] when there is none or it cannot be read."""
    from pathlib import Path

    try:
        listing = OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra
        task = [*listing.overrides.task]
        task += [f"{k}={v}" for k, v in (listing.sweeper.get("params") or {}).items()]
    except Exception:  # no listing (yet), or one this cannot read: nothing known to vary
        return []
    return [key.lstrip("+~") for key, values in sweep_choices(task) or [] if len(values) > 1]
