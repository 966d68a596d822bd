"""Frozen networks: inputs to a task's loss that are never trained (BEiT's visual
tokenizer, a distillation teacher; big_vision passes them as ``task_params``).

They are loaded once per run from the file the config names, moved to the device, kept
out of the optimizer, the FSDP shards and the checkpoints, and passed to ``task.loss`` /
``task.evaluate`` beside the parameters. What a checkpoint keeps is their identity
(:func:`record`): the file and its SHA-256, which a resumed run compares with its own.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, Tuple

import torch

from mim import tasks, tree
from mim.checkpoints import registry
from mim.checkpoints.io import sha256

log = logging.getLogger(__name__)


class FrozenNetworkError(ValueError):
    pass


def load(task, config, backend) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """``(networks, record)``: each frozen network's tree on the device, without gradients,
    and ``{name: {"weights": path, "sha256": digest}}`` (a network built from the seed,
    for tests and ``:tiny`` runs, records ``{"random_init_seed": seed}``)."""
    nets, rec = {}, {}
    for i, (name, spec) in enumerate(sorted(tasks.frozen_networks(task, config).items())):
        if spec.weights:
            path = registry.resolve(spec.weights)     # an official checkpoint's name too
            if not os.path.isfile(path):
                raise FrozenNetworkError(f"frozen network {name!r}: weights file not found: "
                                         f"{spec.weights}")
            params = spec.load(path, None)
            rec[name] = {"weights": os.path.abspath(path), "sha256": sha256(path)}
        else:
            seed = config.seed + 1000003 * (i + 1)
            params = spec.load(None, torch.Generator().manual_seed(seed))
            rec[name] = {"random_init_seed": seed}
            if backend.is_main:
                log.warning("frozen network %r has no weights file: randomly initialised from "
                            "seed %d (fine for tests; set its weights in the config for a real run)",
                            name, seed)
        dtype = backend.param_dtype if spec.cast else None
        nets[name] = tree.map(lambda t: t.detach().to(backend.device, dtype=dtype if t.is_floating_point() else None)
                              .requires_grad_(False), params)
    return nets, rec


def check_resume(saved: dict, current: dict, path: str) -> None:
    """Stop when a resumed run's frozen networks are not the ones its checkpoint used."""
    saved = saved or {}
    if saved == current:
        return
    for name in sorted(set(saved) | set(current)):
        a, b = saved.get(name), current.get(name)
        if a != b:
            raise FrozenNetworkError(
                f"{path} was trained with frozen network {name!r} = {a}, but this run has {b}: "
                f"resume with the same weights file (or use a new --workdir)")
