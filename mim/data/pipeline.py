"""Loaders for a run: the training stream from any step on, and the eval split; and
:func:`to_device`, through which every loader batch reaches the model's device."""
from __future__ import annotations

import functools
from typing import Dict

import torch

from mim import tasks as tasks_lib
from mim.data import device_decode, folder, hf, holdout, sampler, streams, transforms, wds


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


def _read(config):
    """Bytes (a shard member, a dataset row) to what the transform takes."""
    return device_decode.read_bytes if config.data.decode == "device" else folder.decode_bytes


def _dataset(config, split: str, transform, extras=None):
    """A random-access split (a folder, a Hugging Face dataset without streaming) whose
    items are the samplers' ``(index, seed)``."""
    d = config.data
    if streamed(config):
        raise folder.DatasetError(f"data.format={d.format!r} (streamed) has no random access "
                                  f"to samples; this tool needs data.format 'folder' or 'hf'")
    if d.decode == "device" and transform is None:
        raise ValueError("data.decode='device' is only for the default transforms")
    if d.decode == "device":
        transform = device_decode.DeferredTransform(transform)
    if d.format == "hf":
        return hf.ImageRows(d.path, split, d.hf_image_column, d.hf_label_column, transform,
                            extras, read=_read(config))
    if d.decode == "device":
        return folder.ImageFolder(d.path, split, transform, extras, read=device_decode.read)
    return folder.ImageFolder(d.path, split, transform, extras)


def streamed(config) -> bool:
    """Whether the data is read as a stream of shards (:mod:`mim.data.streams`)."""
    return config.data.format == "wds" or (config.data.format == "hf" and config.data.hf_streaming)


def source(config, split: str):
    """A streamed split's shards with their sizes and classes (checked before any work).
    Resolved once per process: counting shards without an index reads all of them."""
    d = config.data
    return _source(d.format, d.path, split, d.train_split, d.eval_split, d.eval_path,
                   d.hf_image_column, d.hf_label_column)


@functools.lru_cache(maxsize=8)
def _source(fmt, path, split, train_split, eval_split, eval_path, image_col, label_col):
    if fmt == "wds":
        import ml_collections
        data = dict(path=path, train_split=train_split, eval_split=eval_split, eval_path=eval_path)
        return wds.resolve(ml_collections.ConfigDict({"data": data}), split)
    return hf.StreamShards(path, split, image_col, label_col)


def _stream(config, split: str, transform, extras, rank: int, world: int, train: bool,
            src=None) -> streams.Stream:
    d = config.data
    if d.decode == "device" and transform is not None:      # None: layout and positions only
        transform = device_decode.DeferredTransform(transform)
    return streams.Stream(src if src is not None else source(config, split), transform, extras,
                          _read(config), config.seed, rank, world, d.num_workers,
                          shuffle=train, buffer=shuffle_buffer(config))


def shuffle_buffer(config) -> int:
    return config.data.shuffle_buffer or 1000


def split_info(config, split: str):
    """(images, classes) of a split, found without decoding an image."""
    if streamed(config):
        src = source(config, split)
        return len(src), src.classes
    if config.data.format == "hf":
        ds = hf.ImageRows(config.data.path, split, config.data.hf_image_column,
                          config.data.hf_label_column, lambda x: x, read=lambda b: b)
        return len(ds), ds.classes
    ds = folder.ImageFolder(config.data.path, split, lambda x: x)
    return len(ds), ds.classes


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


def _stream_loader(ds, config, device_type):
    workers = config.data.num_workers
    # batches are collated in the workers (streams.TrainStream / EvalStream)
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, collate_fn=_as_is,
        pin_memory=device_type in ("cuda", "npu"), persistent_workers=False,
        prefetch_factor=config.data.prefetch if workers > 0 else None)


def _as_is(batch):
    return batch


def _check_classes(config, ds):
    num_classes = config.model.get("num_classes", 0)
    if num_classes and len(ds.classes) > num_classes:
        raise folder.DatasetError(
            f"{ds.root} has {len(ds.classes)} classes but config.model.num_classes={num_classes}")
    return num_classes


def train_loader(config, backend, task, start_step: int, total_steps: int):
    if streamed(config):
        local = config.batch_size // backend.world_size
        st = _stream(config, config.data.train_split, task_transform(config, task, True),
                     seed_extras(config, task), backend.rank, backend.world_size, train=True)
        if len(st.source) < config.batch_size:
            raise folder.DatasetError(f"the training split has {len(st.source)} images, fewer "
                                      f"than one global batch of {config.batch_size}")
        num_classes = _check_classes(config, st.source)
        mix = transforms.mixup(config.data, num_classes) if num_classes else None
        ds = streams.TrainStream(st, local, start_step, total_steps, collate(config, mix))
        return _stream_loader(ds, config, backend.device_type), ds, None
    ds = train_dataset(config, task)
    frac = holdout.fraction(config)
    if frac:  # config.probe.holdout: those images never train
        ds = holdout.Subset(ds, holdout.split(len(ds), frac)[0])
    num_classes = _check_classes(config, ds)
    mix = transforms.mixup(config.data, num_classes) if num_classes else None
    bs = sampler.TrainBatchSampler(len(ds), config.batch_size, backend.rank, backend.world_size,
                                   config.seed, start_step, total_steps)
    return _loader(ds, bs, config, collate(config, mix), backend.device_type), ds, bs


def _eval_stream(config, backend, split, transform, extras):
    local = max(config.eval_batch_size // backend.world_size, 1)
    st = _stream(config, split, transform, extras, backend.rank, backend.world_size, train=False)
    ds = streams.EvalStream(st, local, collate(config))
    return _stream_loader(ds, config, backend.device_type), ds


def eval_loader(config, backend, task=None):
    if streamed(config):
        return _eval_stream(config, backend, config.data.eval_split,
                            task_transform(config, task, False), seed_extras(config, task, train=False))
    ds = eval_dataset(config, task)
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, collate(config), backend.device_type), ds


def split_loader(config, backend, split: str):
    """Any split through timm's eval transform (one ``image`` per sample), each image once,
    sharded over ranks: the feature banks of the k-NN evaluator."""
    if streamed(config):
        return _eval_stream(config, backend, split, transforms.eval_transform(config.data),
                            seed_extras(config, None, train=False))[0]
    ds = _dataset(config, split, transforms.eval_transform(config.data),
                  seed_extras(config, None, train=False))
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, collate(config), backend.device_type)


def num_train_images(config) -> int:
    """The images that train (without those ``config.probe.holdout`` keeps out)."""
    n = split_info(config, config.data.train_split)[0]
    frac = holdout.fraction(config)
    return len(holdout.split(n, frac)[0]) if frac else n


def holdout_loader(config, backend, task=None):
    """The held-out part of the train split (``config.probe.holdout``) through the eval
    transform, each image once, sharded over ranks; None without a holdout."""
    frac = holdout.fraction(config)
    if not frac:
        return None
    ds = _dataset(config, config.data.train_split, task_transform(config, task, False),
                  seed_extras(config, task, train=False))
    ds = holdout.Subset(ds, holdout.split(len(ds), frac)[1])
    local = max(config.eval_batch_size // backend.world_size, 1)
    bs = sampler.EvalBatchSampler(len(ds), local, backend.rank, backend.world_size, config.seed)
    return _loader(ds, bs, config, collate(config), backend.device_type)


def data_position(config, world_size: int, step: int, steps_per_epoch: int):
    """The checkpoint's record of where the data is after ``step`` steps. The step fixes
    it for every format; streamed formats also record each worker's epoch, shard and
    offset, and the layout a resumed run must match (:func:`check_resume`)."""
    out = {"step": step, "steps_per_epoch": steps_per_epoch, "format": config.data.format}
    if streamed(config):
        st = _stream(config, config.data.train_split, None, None, 0, world_size, train=True,
                     src=source(config, config.data.train_split))
        out.update(streams.position(st, step, config.batch_size // world_size))
    return out


def check_resume(config, world_size: int, recorded) -> None:
    """A one-line error when a streamed run resumes with another split of its shards over
    ranks and workers: each worker's place in its stream would not carry over."""
    if not streamed(config) or not recorded:
        return
    st = _stream(config, config.data.train_split, None, None, 0, world_size, train=True,
                 src=source(config, config.data.train_split))
    now, then = st.layout(), recorded.get("layout")
    if then != now:
        diff = {k: (then or {}).get(k) for k in now if (then or {}).get(k) != now[k]}
        raise folder.DatasetError(
            f"the checkpoint's data stream was laid out as {diff}, this run as "
            f"{ {k: now[k] for k in diff} }: resume with the same ranks, data.num_workers, "
            f"shards, data.shuffle_buffer and seed")


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
