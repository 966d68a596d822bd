"""BEiT's data side: the two views of one crop (mim.data.beit_views) against the reference's
``DataAugmentationForBEiT`` steps re-stated here (torchvision ColorJitter and flip, the
``RandomResizedCropAndInterpolationWithTwoPic`` crop from beit/transforms.py, ToTensor +
Normalize / map_pixels) under the same seeds; and the blockwise mask generator
(mim.data.masks) against a re-statement of ``masking_generator.MaskingGenerator``."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from mim.data import beit_views, masks
from mim.models import dalle

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def picture(w=160, h=120, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) % 64 * 4], -1) + rng.integers(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


class ReferenceTwoPic:
    """beit/transforms.py RandomResizedCropAndInterpolationWithTwoPic.__call__ (get_params
    written out), bicubic + lanczos."""

    def __init__(self, size, second_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.second_size, self.scale, self.ratio = size, second_size, scale, ratio

    def get_params(self, img):
        area = img.size[0] * img.size[1]
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if w <= img.size[0] and h <= img.size[1]:
                return random.randint(0, img.size[1] - h), random.randint(0, img.size[0] - w), h, w
        in_ratio = img.size[0] / img.size[1]
        if in_ratio < min(self.ratio):
            w = img.size[0]
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = img.size[1]
            w = int(round(h * max(self.ratio)))
        else:
            w, h = img.size
        return (img.size[1] - h) // 2, (img.size[0] - w) // 2, h, w

    def __call__(self, img):
        i, j, h, w = self.get_params(img)
        return (TF.resized_crop(img, i, j, h, w, (self.size, self.size), Image.BICUBIC),
                TF.resized_crop(img, i, j, h, w, (self.second_size, self.second_size), Image.LANCZOS))


def reference_views(img, size=224, second=112):
    common = T.Compose([T.ColorJitter(0.4, 0.4, 0.4), T.RandomHorizontalFlip(p=0.5),
                        ReferenceTwoPic(size, second)])
    a, b = common(img)
    patch = T.Compose([T.ToTensor(), T.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD))])
    return patch(a), dalle.map_pixels(T.ToTensor()(b))


def seeded(seed, fn, *args):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn(*args)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_views_match_the_reference_augmentation(seed):
    img = picture(seed=seed)
    tf = beit_views.TwoViewTransform(224, 112, MEAN, STD)
    got = seeded(seed, tf, img)
    want_img, want_tok = seeded(seed, reference_views, img)
    assert set(got) == {"image", "tokenizer_image"}
    assert got["image"].shape == (3, 224, 224) and got["tokenizer_image"].shape == (3, 112, 112)
    torch.testing.assert_close(got["image"], want_img, rtol=0, atol=1e-5)
    # (x + 0.125) / 1.25 is map_pixels' 0.8 x + 0.1 up to float rounding.
    torch.testing.assert_close(got["tokenizer_image"], want_tok, rtol=0, atol=1e-6)


def test_both_views_are_the_same_crop():
    """Without jitter and flip, the 112-px view is the 224-px view's region: downsizing the
    224 view by 2 nearly reproduces it, while another draw does not."""
    img = picture(400, 300)
    tf = beit_views.TwoViewTransform(224, 112, (0.0,) * 3, (1.0,) * 3, (0.0,) * 3, (1.0,) * 3,
                                     color_jitter=0.0, hflip=0.0)
    random.seed(5)
    v = tf(img)
    small = torch.nn.functional.avg_pool2d(v["image"][None], 2)[0]
    assert (small - v["tokenizer_image"]).abs().mean() < 0.02
    random.seed(6)
    other = tf(img)
    assert (small - other["tokenizer_image"]).abs().mean() > 0.05


def test_uint8_views_for_device_normalize():
    img = picture()
    f = beit_views.TwoViewTransform(64, 32, MEAN, STD)
    u = beit_views.TwoViewTransform(64, 32, MEAN, STD, uint8=True)
    a, b = seeded(3, f, img), seeded(3, u, img)
    assert b["image"].dtype == torch.uint8 and b["tokenizer_image"].dtype == torch.uint8
    assert b["image"].shape == (3, 64, 64)
    norm = (b["image"].float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(norm, a["image"], rtol=0, atol=1e-5)
    tok = dalle.map_pixels(b["tokenizer_image"].float() / 255)
    torch.testing.assert_close(tok, a["tokenizer_image"], rtol=0, atol=1e-6)


def test_eval_views_are_deterministic_centre_crops():
    img = picture(200, 100)
    tf = beit_views.CentreTwoViewTransform(crop_pct=1.0, image_size=64, tokenizer_size=32,
                                           mean=(0.0,) * 3, std=(1.0,) * 3)
    a, b = seeded(0, tf, img), seeded(1, tf, img)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["tokenizer_image"], b["tokenizer_image"])
    want = TF.to_tensor(TF.resized_crop(img, 0, 50, 100, 100, [64, 64], Image.BICUBIC))
    torch.testing.assert_close(a["image"], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="interpolation"):
        beit_views.TwoViewTransform(interpolation="nearest-ish")
    with pytest.raises(ValueError, match="scale"):
        beit_views.TwoViewTransform(scale=(0.5, 0.1))


# --------------------------------------------------------------------------- masks


def reference_mask(rng: random.Random, H=14, W=14, num=75, min_num=16, max_num=None,
                   min_aspect=0.3, max_aspect=None):
    """masking_generator.MaskingGenerator.__call__ with its own random.Random."""
    max_num = num if max_num is None else max_num
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((H, W), dtype=int)

    def one(max_mask):
        delta = 0
        for _ in range(10):
            target = rng.uniform(min_num, max_mask)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < W and h < H:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                masked = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - masked <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    count = 0
    while count < num:
        delta = one(min(num - count, max_num))
        if delta == 0:
            break
        count += delta
    return mask


def blocks_in(mask: np.ndarray) -> int:
    """Number of 4-connected masked regions."""
    seen, n = np.zeros_like(mask, dtype=bool), 0
    for i, j in zip(*np.nonzero(mask)):
        if seen[i, j]:
            continue
        n += 1
        stack = [(i, j)]
        while stack:
            a, b = stack.pop()
            if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[a, b] and not seen[a, b]:
                seen[a, b] = True
                stack += [(a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)]
    return n


def test_block_mask_statistics_match_the_reference_generator():
    n = 1500
    rng = random.Random(0)
    ref = np.stack([reference_mask(rng) for _ in range(n)])
    gen = torch.Generator().manual_seed(0)
    ours = masks.beit_block_masks(gen, n, 14, num_masking_patches=75, min_num_patches=16).numpy()
    rc, oc = ref.sum((1, 2)), ours.sum((1, 2))
    print(f"count mean ref {rc.mean():.2f} ours {oc.mean():.2f}; exactly 75: {np.mean(rc == 75):.3f} "
          f"{np.mean(oc == 75):.3f}; min {rc.min()} {oc.min()}")
    assert oc.max() <= 75 and rc.max() <= 75
    assert abs(rc.mean() - oc.mean()) < 0.3
    assert abs(np.mean(rc == 75) - np.mean(oc == 75)) < 0.06
    assert abs(np.mean(rc < 70) - np.mean(oc < 70)) < 0.03
    # Where masks fall: per-patch frequency (centre-heavy) agrees patch by patch.
    rf, of = ref.mean(0), ours.mean(0)
    assert np.abs(rf - of).max() < 0.07 and np.corrcoef(rf.ravel(), of.ravel())[0, 1] > 0.8
    # Shape: the number of separate masked regions.
    rb = np.array([blocks_in(m) for m in ref[:400]])
    ob = np.array([blocks_in(m) for m in ours[:400]])
    assert abs(rb.mean() - ob.mean()) < 0.25


def test_settings_that_give_empty_masks_are_refused():
    """unilm issue 551: --num_mask_patches 1 with the default minimum block of 16 patches
    gives empty masks and a NaN loss in the reference; such settings are refused."""
    rng = random.Random(1)
    empty = np.mean([reference_mask(rng, num=1).sum() == 0 for _ in range(300)])
    assert empty > 0.5                                   # the reference's failure is real
    masks.check_beit_mask(14, 75, 16)                    # the recipe passes
    for kw in (dict(num_masking_patches=1), dict(num_masking_patches=10),
               dict(num_masking_patches=75, max_num_patches=8)):
        with pytest.raises(ValueError, match="min_num_patches=16"):
            masks.check_beit_mask(14, min_num_patches=16, **kw)
    with pytest.raises(ValueError, match="smaller than"):
        masks.check_beit_mask(4, num_masking_patches=12, min_num_patches=10)
    with pytest.raises(ValueError, match="exceeds"):
        masks.check_beit_mask(4, num_masking_patches=17, min_num_patches=1)
