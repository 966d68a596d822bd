"""Training and evaluation transforms, built by timm (RandomResizedCrop, flip,
colour jitter, RandAugment, random erasing; resize + centre crop) and timm's Mixup."""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup, create_transform


def train_transform(d):
    return create_transform(
        input_size=d.image_size, is_training=True,
        scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio), hflip=d.hflip,
        color_jitter=d.color_jitter or None, auto_augment=d.auto_augment or None,
        interpolation=d.interpolation, mean=tuple(d.mean), std=tuple(d.std),
        re_prob=d.re_prob, re_mode=d.re_mode, re_count=d.re_count)


def eval_transform(d):
    return create_transform(
        input_size=d.image_size, is_training=False, interpolation=d.interpolation,
        mean=tuple(d.mean), std=tuple(d.std), crop_pct=d.crop_pct)


def mixup(d, num_classes: int):
    """timm's Mixup/CutMix (Zhang et al. 2018; Yun et al. 2019), or None when off."""
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob,
                 switch_prob=d.mixup_switch_prob, mode="batch",
                 label_smoothing=d.label_smoothing, num_classes=num_classes)


class Collate:
    """Stack samples; apply Mixup/CutMix per batch, seeded from the batch's first sample
    so that it is deterministic too. Picklable for worker processes."""

    def __init__(self, mix=None):
        self.mix = mix

    def __call__(self, samples):
        batch = torch.utils.data.default_collate(samples)
        batch["skipped"] = batch["skipped"].sum()
        seeds = batch.pop("mix_seed", None)
        if self.mix is not None:
            np.random.seed(int(seeds[0]) % (1 << 32) if seeds is not None else 0)
            if batch["image"].shape[0] % 2:
                raise ValueError("mixup/cutmix needs an even per-device batch")
            batch["image"], batch["soft_label"] = self.mix(batch["image"], batch["label"])
        return batch
