"""MoBY's BYOL views against a re-statement of SwinTransformer/Transformer-SSL
``data/build.py`` (``SSL_AUG_TYPE: byol``: torchvision Compose with the reference's
parameters, its numpy-drawn PIL blur, ToTensor and Normalize), run from the same seeds."""
import os
import random

import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms

from mim.data import ssl_views
from mim.data.transforms import MultiView

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "third_party", "cifar10-mini", "train", "bird")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class RefBlur:
    def __call__(self, x):
        sigma = np.random.uniform(0.1, 2.0)
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


def reference(size):
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    t1 = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RefBlur()], p=1.0),
        transforms.ToTensor(), normalize])
    t2 = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.08, 1.)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([RefBlur()], p=0.1),
        transforms.RandomApply([ImageOps.solarize], p=0.2),
        transforms.ToTensor(), normalize])
    return t1, t2


def cfg(size=64, device_normalize=False, blur_sigma=(0.1, 2.0)):
    return ml_collections.ConfigDict(dict(data=dict(
        image_size=size, crop_scale=(0.08, 1.0), mean=MEAN, std=STD,
        device_normalize=device_normalize, blur_sigma=blur_sigma)))


def seed_all(s):
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def pictures(n=3):
    names = sorted(os.listdir(IMAGE))[:n]
    return [Image.open(os.path.join(IMAGE, f)).convert("RGB") for f in names]


@pytest.mark.parametrize("size", [64, 224])
def test_views_equal_the_reference_from_the_same_seeds(size):
    mine = ssl_views.views(cfg(size))
    ref = reference(size)
    small = size < 100
    for img in pictures(2 if small else 1):
        for s in range(12 if small else 3):   # 24 draws take both branches of each RandomApply
            for key, r in zip(ssl_views.KEYS, ref):
                seed_all(s)
                a = mine[key](img)
                seed_all(s)
                b = r(img)
                assert a.shape == (3, size, size) and a.dtype == torch.float32
                assert torch.allclose(a, b, atol=1e-6, rtol=0), (key, s)


def test_uint8_views_for_device_normalisation():
    mine_u8 = ssl_views.views(cfg(64, device_normalize=True))
    mine_f = ssl_views.views(cfg(64))
    img = pictures(1)[0]
    for key in ssl_views.KEYS:
        seed_all(5)
        u = mine_u8[key](img)
        seed_all(5)
        f = mine_f[key](img)
        assert u.dtype == torch.uint8 and u.shape == (3, 64, 64)
        m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        assert torch.allclose((u.float() / 255 - m) / s, f, atol=1e-6)


def test_solarisation_and_blur_rates():
    """View 2 is solarised in about 20% of draws and view 1 never; view 1 is always
    blurred (its blur radius is drawn every time: numpy's generator moves)."""
    ops1 = ssl_views.byol_ops(0, 32, (0.08, 1.0))
    ops2 = ssl_views.byol_ops(1, 32, (0.08, 1.0))
    assert not any(isinstance(t, transforms.RandomApply) and t.transforms[0] is ssl_views.solarize
                   for t in ops1.transforms)
    solar = [t for t in ops2.transforms if isinstance(t, transforms.RandomApply)
             and t.transforms[0] is ssl_views.solarize]
    assert len(solar) == 1 and solar[0].p == 0.2
    blur = [t.p for t in ops1.transforms + ops2.transforms if isinstance(t, transforms.RandomApply)
            and isinstance(t.transforms[0], ssl_views.GaussianBlur)]
    assert blur == [1.0, 0.1]
    img = pictures(1)[0]
    moved = 0
    for s in range(20):
        seed_all(s)
        before = np.random.get_state()[1].copy()
        ops1(img)
        moved += not np.array_equal(before, np.random.get_state()[1])
    assert moved == 20


def test_multiview_draws_each_view_apart():
    t = MultiView(ssl_views.views(cfg(32)))
    img = pictures(1)[0]
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert set(a) == {"image", "image2"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["image"], a["image2"])
    torch.manual_seed(1)
    c = t(img)
    assert not torch.equal(a["image"], c["image"])


def test_bad_crop_scale_is_named():
    c = cfg()
    c.data.crop_scale = (0.0, 1.0)
    with pytest.raises(ValueError, match="config.data.crop_scale"):
        ssl_views.views(c)


def test_blur_sigma_sets_the_blur_range():
    """data.blur_sigma: view 1 (always blurred) equals PIL's blur at the sigma drawn from
    numpy in that range; (0, 0) leaves the crop unblurred; a bad range is named."""
    c = cfg(size=32, blur_sigma=(0.3, 0.5))
    v = ssl_views.views(c)["image"]
    img = pictures(1)[0]
    seed_all(5)
    got = v(img)
    # the same draws with the blur radius re-stated: sigma ~ U(0.3, 0.5) from numpy
    ops = ssl_views.byol_ops(0, 32, (0.08, 1.0), (0.0, 0.0))
    seed_all(5)
    crop = ops.transforms[:4]
    out = img
    for t in crop:
        out = t(out)
    torch.rand(1)  # RandomApply's draw (p = 1.0) before the blur; the sigma is numpy's
    sigma = np.random.uniform(0.3, 0.5)
    want = transforms.Normalize(MEAN, STD)(transforms.ToTensor()(out.filter(ImageFilter.GaussianBlur(radius=sigma))))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="config.data.blur_sigma"):
        ssl_views.views(cfg(blur_sigma=(2.0, 1.0)))
