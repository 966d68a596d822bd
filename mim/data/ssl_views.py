"""MoBY's two asymmetric views (BYOL's augmentation, Grill et al. 2020 Table 6), as
SwinTransformer/Transformer-SSL ``data/build.py`` builds them for ``SSL_AUG_TYPE: byol``.

Both views: ``RandomResizedCrop(224, scale=(SSL_AUG_CROP = 0.08, 1))`` (torchvision's
default bilinear resize and 3/4-4/3 aspect range: the reference passes neither),
horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2,
hue 0.1) with p 0.8, grayscale with p 0.2, then

* view 1 (``image``): Gaussian blur with p 1.0, no solarisation;
* view 2 (``image2``): Gaussian blur with p 0.1, solarisation (PIL ``ImageOps.solarize``,
  threshold 128) with p 0.2;

and ImageNet normalisation. The blur is the reference's ``GaussianBlur`` ("version 2"):
PIL's ``ImageFilter.GaussianBlur`` with radius sigma ~ U(0.1, 2.0) drawn from numpy, no
kernel size of its own (PIL sizes the kernel from sigma). The random draws are
torchvision's (torch's generator) and numpy's, which :class:`mim.data.transforms.MultiView`
seeds per (sample seed, view), so a view depends on (seed, epoch, index, view) only.

Each view ends in :func:`mim.data.transforms.finish`: uint8 with ``data.device_normalize``
(normalised on the device), else float normalised in the worker.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import ImageFilter, ImageOps
from torchvision import transforms as T

from mim.data.transforms import MultiView, finish

# data/build.py, SSL_AUG_TYPE == 'byol'
JITTER = (0.4, 0.4, 0.2, 0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
BLUR_P = (1.0, 0.1)
SOLARIZE_P = (0.0, 0.2)
KEYS = ("image", "image2")


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2.0) from numpy's generator (the reference's
    ``GaussianBlur``, its "version 2")."""

    def __init__(self, sigma: Tuple[float, float] = BLUR_SIGMA):
        self.sigma = tuple(sigma)

    def __call__(self, img):
        sigma = np.random.uniform(*self.sigma)
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def solarize(img):
    """``ImageOps.solarize`` with its default threshold 128, as the reference applies it."""
    return ImageOps.solarize(img)


def byol_ops(view: int, image_size: int, crop_scale: Tuple[float, float],
             blur_sigma: Tuple[float, float] = BLUR_SIGMA) -> T.Compose:
    """The PIL operations of view ``view`` (0 or 1), in the reference's order. View 1 has
    no solarisation step at all (the reference lists none), so it draws nothing for it."""
    ops = [
        T.RandomResizedCrop(image_size, scale=tuple(crop_scale)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
        T.RandomGrayscale(p=GRAYSCALE_P),
        T.RandomApply([GaussianBlur(blur_sigma)], p=BLUR_P[view]),
    ]
    if SOLARIZE_P[view] > 0:
        ops.append(T.RandomApply([solarize], p=SOLARIZE_P[view]))
    return T.Compose(ops)


class View:
    """One augmented view ending in :func:`finish`. Picklable (data-loader workers)."""

    def __init__(self, ops, mean: Sequence[float], std: Sequence[float], uint8: bool):
        self.ops, self.mean, self.std, self.uint8 = ops, tuple(mean), tuple(std), uint8

    def __call__(self, img):
        return finish(self.ops(img.convert("RGB")), self.mean, self.std, self.uint8)


def views(config) -> Dict[str, View]:
    """``{"image": view 1, "image2": view 2}`` for ``config.data`` (``image_size``,
    ``crop_scale`` = (SSL_AUG_CROP, 1), ``blur_sigma`` (BYOL's (0.1, 2.0) px, set for
    224-px views), ``mean``, ``std``, ``device_normalize``)."""
    d = config.data
    scale = tuple(d.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"config.data.crop_scale: {scale} must be (min, max) with 0 < min <= max <= 1")
    sigma = tuple(d.blur_sigma)
    if len(sigma) != 2 or not 0 <= sigma[0] <= sigma[1]:
        raise ValueError(f"config.data.blur_sigma: {sigma} must be (min, max) with 0 <= min <= max")
    return {key: View(byol_ops(i, d.image_size, scale, sigma), d.mean, d.std, bool(d.device_normalize))
            for i, key in enumerate(KEYS)}


def train_transform(config) -> MultiView:
    """PIL image -> ``{"image": view 1, "image2": view 2}``, each view seeded apart."""
    return MultiView(views(config))
