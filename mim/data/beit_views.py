"""BEiT's pretraining views (microsoft/unilm ``beit/datasets.py`` ``DataAugmentationForBEiT``
and ``beit/transforms.py`` ``RandomResizedCropAndInterpolationWithTwoPic``).

One image gives two views of ONE crop: colour jitter (brightness, contrast, saturation 0.4)
and a horizontal flip on the whole image, then a single random resized crop (scale 0.08-1,
aspect 3/4-4/3) resized twice, bicubic to the model's 224 px (``image``) and Lanczos to the
tokenizer's 112 px (``tokenizer_image``). The crop draw is timm's
``RandomResizedCropAndInterpolation.get_params``, the reference's own procedure (Python
``random``; ten tries, then a centre crop); jitter and flip are torchvision's (torch RNG).

Each view ends in :func:`mim.data.transforms.finish`: a uint8 ``(C, H, W)`` tensor when
``data.device_normalize`` is on (normalised on the device), else a float tensor normalised
here, ``(x - mean) / std``; for the DALL-E tokenizer that is ``(x + 0.125) / 1.25 =
0.8 x + 0.1`` (``map_pixels``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mim.data.transforms import finish

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "hamming": InterpolationMode.HAMMING,
}


def _mode(name: str) -> InterpolationMode:
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation {name!r}: must be one of {sorted(INTERPOLATIONS)}")
    return INTERPOLATIONS[name]


class TwoViewTransform:
    """PIL image -> ``{"image": ..., "tokenizer_image": ...}``, the two resizes of one random
    crop after colour jitter and flip. Picklable (data-loader workers)."""

    def __init__(self, image_size: int = 224, tokenizer_size: int = 112,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 tokenizer_mean: Sequence[float] = (-0.125,) * 3, tokenizer_std: Sequence[float] = (1.25,) * 3,
                 uint8: bool = False, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), color_jitter: float = 0.4,
                 hflip: float = 0.5, interpolation: str = "bicubic",
                 tokenizer_interpolation: str = "lanczos"):
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop scale {tuple(scale)}: must satisfy 0 < min <= max <= 1")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"crop ratio {tuple(ratio)}: must satisfy 0 < min <= max")
        self.image_size, self.tokenizer_size = image_size, tokenizer_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer_mean, self.tokenizer_std = tuple(tokenizer_mean), tuple(tokenizer_std)
        self.uint8 = uint8
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = _mode(interpolation)
        self.tokenizer_interpolation = _mode(tokenizer_interpolation)
        # datasets.py: ColorJitter(0.4, 0.4, 0.4) (no hue), then RandomHorizontalFlip(0.5).
        ops = []
        if color_jitter > 0:
            ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(p=hflip))
        self.common = T.Compose(ops)

    def crops(self, img: Image.Image) -> Tuple[Image.Image, Image.Image]:
        """The two PIL views of one crop (after jitter and flip)."""
        img = self.common(img.convert("RGB"))
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(img, self.scale, self.ratio)
        big = TF.resized_crop(img, i, j, h, w, [self.image_size] * 2, self.interpolation)
        small = TF.resized_crop(img, i, j, h, w, [self.tokenizer_size] * 2, self.tokenizer_interpolation)
        return big, small

    def __call__(self, img: Image.Image) -> Dict[str, torch.Tensor]:
        big, small = self.crops(img)
        return {"image": finish(big, self.mean, self.std, self.uint8),
                "tokenizer_image": finish(small, self.tokenizer_mean, self.tokenizer_std, self.uint8)}


class CentreTwoViewTransform(TwoViewTransform):
    """Evaluation views: no jitter or flip, and the central square of ``crop_pct`` of the
    shorter side instead of a random crop (as timm's eval resize + centre crop), resized to
    both sizes. The reference has no evaluation split for pretraining; this one makes the
    masked-token loss on held-out images comparable across steps and runs."""

    def __init__(self, crop_pct: float = 0.875, **kwargs):
        kwargs.update(color_jitter=0.0, hflip=0.0)
        super().__init__(**kwargs)
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct={crop_pct}: must be in (0, 1]")
        self.crop_pct = crop_pct

    def crops(self, img: Image.Image) -> Tuple[Image.Image, Image.Image]:
        img = img.convert("RGB")
        W, H = img.size
        side = max(1, int(round(min(W, H) * self.crop_pct)))
        i, j = (H - side) // 2, (W - side) // 2
        big = TF.resized_crop(img, i, j, side, side, [self.image_size] * 2, self.interpolation)
        small = TF.resized_crop(img, i, j, side, side, [self.tokenizer_size] * 2, self.tokenizer_interpolation)
        return big, small
