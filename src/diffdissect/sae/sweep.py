"""A sweep of SAE runs from a config file and/or flags: every combination of the list-valued options."""

from __future__ import annotations

import itertools
from typing import Any

from diffdissect.errors import SpecError
from diffdissect.sae.train import TrainConfig

SWEPT = ("layer", "t", "k", "expansion")
ALIASES = {"layers": "layer", "timesteps": "t"}


def sweep_configs(file_options: dict[str, Any], flags: dict[str, Any]) -> list[TrainConfig]:
    """TrainConfigs for every combination of layer x t x k x expansion; flags (not None) override the file."""
    options = {ALIASES.get(k, k): v for k, v in file_options.items()}
    options.update({k: v for k, v in flags.items() if v is not None})
    for name in ("layer", "t"):
        if options.get(name) in (None, []):
            raise SpecError(
                f"no {'layers' if name == 'layer' else 'timesteps'} given: pass --{'layers' if name == 'layer' else 'timesteps'} "
                "or put them in --config"
            )
    lists = {k: (v if isinstance(v, list) else [v]) for k, v in options.items() if k in SWEPT}
    fixed = {k: v for k, v in options.items() if k not in SWEPT}
    if fixed.get("n_latents"):
        lists.pop("expansion", None)
    names = list(lists)
    configs = [
        TrainConfig.from_json({**fixed, **dict(zip(names, combo))}) for combo in itertools.product(*lists.values())
    ]
    return configs
