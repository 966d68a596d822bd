"""Loaders for a run: the training stream from any step on, and the eval split; and
:func:`to_device`, through which every loader batch reaches the model's device."""
from __future__ import annotations

import functools
from typing import Dict

import torch

from mim import tasks as tasks_lib
from mim.data import device_decode, folder, sampler, transforms


def _seed_extras(extras_fn, config, gen: torch.Generator, erase: bool = False) -> Dict[str, torch.Tensor]:
    out = extras_fn(gen, config) if extras_fn is not None else {}
    # a per-sample seed for batch-level randomness (mixup) in the collate function
    out["mix_seed"] = torch.randint(0, 2 ** 62, (), generator=gen)
    if erase:
        # random erasing runs on the device (data.device_normalize), seeded per image
        out["erase_seed"] = torch.randint(0, 2 ** 62, (), generator=gen)
    return out


def seed_extras(config, task, train: bool = True):
    """The per-sample draws (from the sample's own seed) that travel with its image: the
    task's ``batch_extras``, ``mix_seed`` and, for training with random erasing on the
    device, ``erase_seed``."""
    d = config.data
    return functools.partial(_seed_extras, getattr(task, "batch_extras", None), config,
                             erase=train and d.device_normalize and d.re_prob > 0)


def _loader(dataset, batch_sampler, config, collate, device_type):
    workers = config.data.num_workers
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
        pin_memory=device_type in ("cuda", "npu"), persistent_workers=False,
        prefetch_factor=config.data.prefetch if workers > 0 else None)


def _dataset(config, split: str, transform, extras=None):
    if config.data.decode == "device" and transform is None:
        raise ValueError("data.decode='device' is only for the default transforms")
    if config.data.decode == "device":
        return folder.ImageFolder(config.data.path, split, device_decode.DeferredTransform(transform),
                                  extras, read=device_decode.read)
    return folder.ImageFolder(config.data.path, split, transform, extras)


def task_transform(config, task, train: bool):
    """The task's own transform (several views per image) or timm's; a task's own cannot
    be replayed on the device, so ``data.decode='device'`` refuses it."""
    own = getattr(task, "train_transform" if train else "eval_transform", None)
    if own is None:
        return transforms.train_transform(config.data) if train else transforms.eval_transform(config.data)
    if config.data.decode == "device":
        from mim.config import ConfigError
        raise ConfigError(f"config.data.decode: 'device' replays timm's crop and flip on one "
                          f"image; task {config.task!r} builds its own "
                          f"{'train' if train else 'eval'} views "
                          f"({sorted(tasks_lib.image_keys(task, config, train))}); "
                          f"use data.decode='worker'")
    return own(config)


def train_dataset(config, task=None):
    """The train split with the train transform; with ``data.decode='device'`` its samples
    are JPEG bytes plus the drawn crop and flip (:mod:`mim.data.device_decode`)."""
    return _dataset(config, config.data.train_split, task_transform(config, task, True),
                    seed_extras(config, task))


def eval_dataset(config, task=None):
    return _dataset(config, config.data.eval_split, task_transform(config, task, False),
                    seed_extras(config, task, train=False))


def collate(config, mix=None) -> transforms.Collate:
    d = config.data
    return transforms.Collate(mix, uint8=d.device_normalize, encoded=d.decode == "device")


def train_loader(config, backend, task, start_step: int, total_steps: int):
    ds = train_dataset(config, task)
    num_classes = config.model.get("num_classes", 0)
    if num_classes and len(ds.classes) > num_classes:
        raise folder.DatasetError(
            f"{ds.root} has {len(ds.classes)} classes but config.model.num_classes={num_classes}")
    mix = transforms.mixup(config.data, num_classes) if num_classes else None
    bs = sampler.TrainBatchSampler(len(ds), config.batch_size, backend.rank, backend.world_size,
                                   config.seed, start_step, total_steps)
    return _loader(ds, bs, config, collate(config, mix), backend.device_type), ds, bs


def eval_loader(config, backend, task=None):
    ds = eval_dataset(config, task)
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, collate(config), backend.device_type), ds


def split_loader(config, backend, split: str):
    """Any split through timm's eval transform (one ``image`` per sample), each image once,
    sharded over ranks: the feature banks of the k-NN evaluator."""
    ds = _dataset(config, split, transforms.eval_transform(config.data),
                  seed_extras(config, None, train=False))
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, collate(config), backend.device_type)


def num_train_images(config) -> int:
    ds = folder.ImageFolder(config.data.path, config.data.train_split, lambda x: x)
    return len(ds)


# One per device and setting, so that its mean and std are copied to the device once.
_device_normalize = functools.lru_cache(maxsize=8)(transforms.DeviceNormalize)


def to_device(batch: Dict[str, torch.Tensor], device, data_config, train: bool = True,
              views=None) -> Dict[str, torch.Tensor]:
    """A loader batch on ``device`` (non-blocking copies). With ``data.decode='device'``
    its JPEGs are decoded there and cropped and flipped as drawn in the workers (``train``:
    the batch is from the train transform, else from the eval one). With
    ``data.device_normalize`` its uint8 images become normalised floats there, each image
    key with its own normalisation (``views``: ``{key: mim.tasks.View}``, by default the
    one ``image`` of ``data.mean`` / ``data.std``) and, when it carries ``erase_seed``
    (training with ``data.re_prob > 0``), ``image`` is randomly erased per image."""
    d = data_config
    if views is None:
        views = {"image": tasks_lib.View(d.image_size, tuple(d.mean), tuple(d.std))}
    seeds = batch.get("erase_seed")
    batch = dict(batch)
    if d.decode == "device":
        if "geometry" not in batch:
            raise ValueError("data.decode='device' but the batch has no geometry (made by a "
                             "loader with data.decode='worker'?)")
        # timm's transform, rebuilt (tens of microseconds) so that it always follows the config
        t = transforms.train_transform(d) if train else transforms.eval_transform(d)
        batch = device_decode.DeviceDecoder(t, device).decode_batch(batch, train)
    elif "geometry" in batch:
        raise ValueError("the batch carries JPEG geometry but data.decode is 'worker'")
    out = {}
    for k, v in batch.items():
        if k == "erase_seed":
            continue
        if k in views and d.device_normalize:
            erase = k == "image"
            norm = _device_normalize(torch.device(device), tuple(views[k].mean), tuple(views[k].std),
                                     float(d.re_prob) if erase else 0.0, d.re_mode, int(d.re_count))
            out[k] = norm(v, seeds if erase else None)
        elif k in views and v.dtype == torch.uint8:
            raise TypeError(f"the loader made uint8 images ({k!r}) but data.device_normalize is False")
        else:
            out[k] = v.to(device, non_blocking=True)
    if seeds is not None and not d.device_normalize:
        raise ValueError("the batch carries erase_seed but data.device_normalize is False")
    return out
