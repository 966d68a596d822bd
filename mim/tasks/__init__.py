"""Tasks: what a recipe trains. Each task module defines

- ``init(config, gen) -> (params, model_state)``
- ``loss(params, model_state, batch, config, train) -> (loss, (model_state, metrics))``
- ``evaluate(params, model_state, batch, config) -> {name: summed tensor}`` (optional)
- ``param_rules(config) -> ParamRules`` (layer ids, frozen and no-decay patterns)
- ``batch_extras(gen, config) -> {name: tensor}``: per-sample inputs the pipeline draws
  (MAE noise, SimMIM masks), so the step stays deterministic.
- ``hooks(setup, writer)`` (optional): an object with ``due(step) -> bool`` and
  ``after_step(step, params, batch, metrics)``, which runs on every rank after each step
  that is due, with the whole parameter tree (reconstruction pictures).
- ``summarize(sums) -> metrics`` (optional): turns summed ``evaluate`` outputs into
  metrics; the default gives acc1 / acc5 / loss from correct1, correct5, loss_sum, count.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Sequence

TASKS = {
    "classify": "mim.tasks.classify",
    "mae_pretrain": "mim.tasks.mae_pretrain",
    "linprobe": "mim.tasks.linprobe",
    "simmim_pretrain": "mim.tasks.simmim_pretrain",
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
