"""Tasks: what a recipe trains. Each task module defines

- ``init(config, gen) -> (params, model_state)``
- ``loss(params, model_state, batch, config, train) -> (loss, (model_state, metrics))``
- ``evaluate(params, model_state, batch, config) -> {name: summed tensor}`` (optional)
- ``param_rules(config) -> ParamRules`` (layer ids, frozen and no-decay patterns)
- ``batch_extras(gen, config) -> {name: tensor}``: per-sample inputs the pipeline draws
  (MAE noise, SimMIM masks), so the step stays deterministic.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Sequence

TASKS = {
    "classify": "mim.tasks.classify",
}


@dataclasses.dataclass
class ParamRules:
    num_layers: int = 0
    layer_id: Optional[Callable[[str], int]] = None
    no_decay: Sequence[str] = ()
    frozen: Sequence[str] = ()


def get(name: str):
    if name not in TASKS:
        raise ValueError(f"config.task={name!r}: must be one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])
