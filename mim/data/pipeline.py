"""Loaders for a run: the training stream from any step on, and the eval split."""
from __future__ import annotations

import functools
from typing import Dict

import torch

from mim.data import folder, sampler, transforms


def _seed_extras(extras_fn, config, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    out = extras_fn(gen, config) if extras_fn is not None else {}
    # a per-sample seed for batch-level randomness (mixup) in the collate function
    out["mix_seed"] = torch.randint(0, 2 ** 62, (), generator=gen)
    return out


def _loader(dataset, batch_sampler, config, collate, device_type):
    workers = config.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device_type in ("cuda", "npu"), persistent_workers=False,
        prefetch_factor=config.data.prefetch if workers > 0 else None)


def train_loader(config, backend, task, start_step: int, total_steps: int):
    extras = functools.partial(_seed_extras, getattr(task, "batch_extras", None), config)
    ds = folder.ImageFolder(config.data.path, config.data.train_split,
                            transforms.train_transform(config.data), extras)
    num_classes = config.model.get("num_classes", 0)
    if num_classes and len(ds.classes) > num_classes:
        raise folder.DatasetError(
            f"{ds.root} has {len(ds.classes)} classes but config.model.num_classes={num_classes}")
    mix = transforms.mixup(config.data, num_classes) if num_classes else None
    bs = sampler.TrainBatchSampler(len(ds), config.batch_size, backend.rank, backend.world_size,
                                   config.seed, start_step, total_steps)
    return _loader(ds, bs, config, transforms.Collate(mix), backend.device_type), ds, bs


def eval_loader(config, backend, task=None):
    extras = functools.partial(_seed_extras, getattr(task, "batch_extras", None), config)
    ds = folder.ImageFolder(config.data.path, config.data.eval_split,
                            transforms.eval_transform(config.data), extras)
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, transforms.Collate(None), backend.device_type), ds


def num_train_images(config) -> int:
    ds = folder.ImageFolder(config.data.path, config.data.train_split, lambda x: x)
    return len(ds)
