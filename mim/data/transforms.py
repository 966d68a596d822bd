"""Training and evaluation transforms, built by timm (RandomResizedCrop, flip,
colour jitter, RandAugment, random erasing; resize + centre crop) and timm's Mixup.

With ``data.device_normalize`` the workers stop at uint8 images (timm's prefetcher
transforms), :class:`Collate` stacks them as one uint8 channels-last batch (mixing with
timm's ``FastCollateMixup``), and :class:`DeviceNormalize` turns the batch into
normalised floats on the device, with random erasing there, as timm's ``PrefetchLoader``
does: a quarter of the bytes cross to the device, and the workers skip the float work."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from timm.data import FastCollateMixup, Mixup, create_transform
from timm.data.random_erasing import RandomErasing


def train_transform(d):
    # use_prefetcher: the same crop, flip and colour ops, ending in a uint8 tensor instead
    # of ToTensor + Normalize + RandomErasing (those run in DeviceNormalize).
    return create_transform(
        input_size=d.image_size, is_training=True,
        scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip,
        color_jitter=d.color_jitter or None, auto_augment=d.auto_augment or None,
        interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std),
        re_prob=d.re_prob, re_mode=d.re_mode, re_count=d.re_count,
        use_prefetcher=d.device_normalize)


def eval_transform(d):
    return create_transform(
        input_size=d.image_size, is_training=False, interpolation=d.interpolation,
        mean=tuple(d.mean), std=tuple(d.std), crop_pct=d.crop_pct,
        use_prefetcher=d.device_normalize)


def mixup(d, num_classes: int):
    """timm's Mixup/CutMix (Zhang et al. 2018; Yun et al. 2019), or None when off; on uint8
    images (``FastCollateMixup``, which mixes while collating) with ``device_normalize``."""
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    cls = FastCollateMixup if d.device_normalize else Mixup
    return cls(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
               switch_prob=d.mixup_switch_prob, mode="batch",
               label_smoothing=d.label_smoothing, num_classes=num_classes)


class Collate:
    """Stack samples; apply Mixup/CutMix per batch, seeded from the batch's first sample
    so that it is deterministic too. Picklable for worker processes.

    ``uint8``: the images are uint8 ``(C, H, W)`` tensors from timm's prefetcher
    transforms, each a view of PIL's ``(H, W, C)`` buffer. They become one uint8
    ``(N, C, H, W)`` batch in channels-last memory format: stacking the ``(H, W, C)``
    buffers copies them without transposing. Mixing is ``FastCollateMixup``'s, which draws
    the same ``lam`` and box as ``Mixup`` from the same seed and rounds mixed pixels to uint8.

    ``encoded``: the images are JPEG bytes of any length (``data.decode='device'``) or
    finished uint8 images; they stay a list, decoded on the device by
    :func:`mim.data.pipeline.to_device`."""

    def __init__(self, mix=None, uint8: bool = False, encoded: bool = False):
        if mix is not None and isinstance(mix, FastCollateMixup) != uint8:
            raise ValueError(f"{type(mix).__name__} does not mix {'uint8' if uint8 else 'float'} "
                             f"images (see transforms.mixup)")
        if encoded and (mix is not None or not uint8):
            raise ValueError("data.decode='device' needs data.device_normalize=True and no mixup/cutmix")
        self.mix, self.uint8, self.encoded = mix, uint8, encoded

    def __call__(self, samples):
        # Evaluation's unreadable files arrive as None (mim.data.folder): dropped, counted.
        unreadable = sum(s is None for s in samples)
        samples = [s for s in samples if s is not None]
        if not samples:
            return {"skipped": torch.tensor(unreadable)}
        if self.encoded:
            samples = [dict(s) for s in samples]
            images = [s.pop("image") for s in samples]
            batch = torch.utils.data.default_collate(samples)
            batch["skipped"] = batch["skipped"].sum() + unreadable
            batch.pop("mix_seed", None)
            batch["image"] = images
            return batch
        if self.uint8:
            samples = [dict(s) for s in samples]
            images = [s.pop("image") for s in samples]
            if images[0].dtype != torch.uint8:
                raise TypeError(f"uint8 collation got {images[0].dtype} images; the transform "
                                f"must be built with data.device_normalize=True")
        batch = torch.utils.data.default_collate(samples)
        batch["skipped"] = batch["skipped"].sum() + unreadable
        seeds = batch.pop("mix_seed", None)
        if self.mix is not None:
            np.random.seed(int(seeds[0]) % (1 << 32) if seeds is not None else 0)
            if batch["label"].shape[0] % 2:
                raise ValueError("mixup/cutmix needs an even per-device batch")
            if self.uint8:
                x, batch["soft_label"] = self.mix(list(zip(images, batch["label"])))
                batch["image"] = x.contiguous(memory_format=torch.channels_last)
            else:
                batch["image"], batch["soft_label"] = self.mix(batch["image"], batch["label"])
        elif self.uint8:
            batch["image"] = torch.stack([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
        return batch


class DeviceNormalize:
    """The device half of ``data.device_normalize``: a uint8 batch is copied to the device
    (non-blocking; the loader pins it for CUDA/NPU), converted to float there and
    normalised, ``(x - 255 mean) / (255 std)``, keeping its channels-last layout; then
    timm's RandomErasing runs on the normalised images when ``erase_seeds`` are given.

    Erasing draws from each sample's own seed instead of the running generators: Python's
    ``random`` (which box) and the device's generator (the fill, modes ``rand``/``pixel``)
    are seeded per image and restored afterwards, so an image is erased the same way in any
    batch, on any rank and after a resume."""

    def __init__(self, device, mean, std, re_prob: float = 0.0, re_mode: str = "pixel",
                 re_count: int = 1):
        self.device = torch.device(device)
        self.mean = torch.tensor([255.0 * m for m in mean], device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor([255.0 * s for s in std], device=self.device).view(1, -1, 1, 1)
        self.erase = (RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device)
                      if re_prob > 0 else None)

    def __call__(self, images: torch.Tensor, erase_seeds=None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"data.device_normalize expects uint8 images from the loader, got "
                            f"{images.dtype}")
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if erase_seeds is not None:
            if self.erase is None:
                raise ValueError("the batch carries erase_seed but data.re_prob is 0")
            self._erase(x, erase_seeds)
        return x

    def _erase(self, x: torch.Tensor, seeds: torch.Tensor) -> None:
        if seeds.shape != (x.shape[0],):
            raise ValueError(f"{tuple(seeds.shape)} erase seeds for a batch of {x.shape[0]} images")
        dev = x.device
        accel = dev.type != "cpu"
        mod = torch.get_device_module(dev.type) if accel else None
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[dev] if accel else [], device_type=dev.type):
                with mod.device(dev) if accel else contextlib.nullcontext():
                    for img, s in zip(x, seeds.tolist()):
                        random.seed(s)
                        if accel:
                            mod.manual_seed(s)        # this device's generator only
                        else:
                            torch.random.default_generator.manual_seed(s)
                        self.erase(img)               # in place, on the view of image i
        finally:
            random.setstate(py_state)


# ----------------------------------------------------------------------------------------
# Several views per image (tasks' own transforms: MoBY's two views, BEiT's tokenizer view).


def finish(img, mean, std, uint8: bool) -> torch.Tensor:
    """The last step of every view: a PIL image to a uint8 ``(C, H, W)`` tensor (normalised
    on the device, ``data.device_normalize``) or to a float tensor normalised here,
    ``(x / 255 - mean) / std``."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    if x.ndim == 2:
        x = x[:, :, None]
    x = x.permute(2, 0, 1)
    if uint8:
        return x
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x.float() / 255.0 - m) / s


class MultiView:
    """Independently augmented views of one image, ``{key: transform(img)}``.

    Each view's random draws come from its own seed, derived from the sample's (the input
    pipeline seeds Python's, numpy's and torch's generators from (seed, epoch, index)
    before calling the transform) and the view's position, so a view is the same whatever
    the other views drew, the number of workers or where a run resumed."""

    def __init__(self, views: dict):
        self.views = dict(views)

    def __call__(self, img) -> dict:
        base = int(torch.randint(0, 2 ** 62, ()).item())
        out = {}
        for i, (key, t) in enumerate(self.views.items()):
            seed = (base + 0x9E3779B97F4A7C15 * (i + 1)) % (1 << 63)
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            out[key] = t(img)
        return out
