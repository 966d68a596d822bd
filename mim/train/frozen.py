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
import types
from typing import Dict, Tuple

import safetensors.torch
import torch

from mim import tasks, tree
from mim.checkpoints import registry
from mim.checkpoints.io import sha256

log = logging.getLogger(__name__)


FITTED_DIR = "frozen"     # <workdir>/frozen/<name>.safetensors: networks fitted by the run


class FrozenNetworkError(ValueError):
    pass


def load(task, config, backend, workdir: str = "") -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """``(networks, record)``: each frozen network's tree on the device, without gradients,
    and ``{name: {"weights": path, "sha256": digest}}`` (a network built from the seed,
    for tests and ``:tiny`` runs, records ``{"random_init_seed": seed}``; one fitted on
    training images (``Frozen.fit``) is saved as ``<workdir>/frozen/<name>.safetensors``,
    read back from there when the run resumes, and recorded by that file and its digest
    with ``fitted_seed``)."""
    nets, rec = {}, {}
    for i, (name, spec) in enumerate(sorted(tasks.frozen_networks(task, config).items())):
        if not spec.weights and spec.fit is not None:
            seed = config.seed + 1000003 * (i + 1)
            params, rec[name] = _fitted(task, config, backend, workdir, name, spec, seed)
        elif spec.weights:
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


def fit_images(task, config, key: str, count: int) -> torch.Tensor:
    """The ``key`` view of the first ``count`` samples of the run's training stream (the
    order, crops and augmentation of its first steps), on the CPU, normalised as the batch
    has them; every rank reads the same ones (as rank 0 of 1)."""
    from mim.data import pipeline        # noqa: PLC0415 - the data layer only when fitting
    one = types.SimpleNamespace(rank=0, world_size=1, device_type="cpu")
    steps = -(-count // config.batch_size)
    loader, _, _ = pipeline.train_loader(config, one, task, 0, steps)
    views = tasks.image_keys(task, config, train=True)
    out, n = [], 0
    for batch in loader:
        batch = pipeline.to_device(batch, torch.device("cpu"), config.data, train=True, views=views)
        out.append(batch[key].float())
        n += out[-1].shape[0]
        if n >= count:
            break
    return torch.cat(out)[:count]


def _fitted(task, config, backend, workdir, name, spec, seed):
    path = os.path.join(workdir, FITTED_DIR, f"{name}.safetensors") if workdir else ""
    if path and os.path.isfile(path):
        return spec.load(path, None), {"weights": os.path.abspath(path), "sha256": sha256(path),
                                        "fitted_seed": seed}
    images = fit_images(task, config, spec.fit_key, spec.fit_images)
    params = spec.fit(images, gen=torch.Generator().manual_seed(seed))
    if backend.is_main:
        log.info("frozen network %r fitted on %d training images (seed %d)%s", name,
                 images.shape[0], seed, f", saved to {path}" if path else "")
    if not path:
        return params, {"fitted_seed": seed}
    if backend.is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        safetensors.torch.save_file({k: v.contiguous() for k, v in tree.flatten(params).items()}, tmp)
        os.replace(tmp, path)
    if backend.distributed:
        torch.distributed.barrier()
    return spec.load(path, None), {"weights": os.path.abspath(path), "sha256": sha256(path),
                                   "fitted_seed": seed}
