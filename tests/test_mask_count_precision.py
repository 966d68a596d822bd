"""Masked-loss denominators under every precision policy.

SimMIM's L1 and MAE's MSE divide by the number of masked pixels / patches of a
micro-batch. fp16's largest value is 65,504: counted in fp16, a few 224-px SimMIM images
or a thousand small MAE images overflow the count to ``inf`` and the loss becomes silently 0
(and with it every gradient). These micro-batches mask more than 65,504 and check that
each policy, applied as :mod:`mim.train.step` applies it, gives the fp32 loss.
"""
import math

import ml_collections
import pytest
import torch

from mim import backend, tree
from mim.data import masks
from mim.models import mae, simmim
from mim.tasks import mae_pretrain, simmim_pretrain

FP16_MAX = torch.finfo(torch.float16).max   # 65,504
POLICIES = ("amp_fp16", "fp16", "amp_bf16", "bf16")
# Bound on |policy loss / fp32 loss - 1|: the compute dtype's unit roundoff (2^-11 for
# fp16, 2^-8 for bf16). A mean over ~10^5 rounded terms lands 10-60x inside it here.
RTOL = {"amp_fp16": 2.0 ** -11, "fp16": 2.0 ** -11, "amp_bf16": 2.0 ** -8, "bf16": 2.0 ** -8}


def policy(precision: str) -> backend.Backend:
    """The CPU backend of ``precision``; skipped where this torch build cannot run it."""
    be = backend.setup("cpu", precision, "off")
    w = torch.ones(4, 4, dtype=be.param_dtype)
    try:
        with be.autocast():
            y = torch.nn.functional.linear(w, w) @ w
            z = torch.nn.functional.conv2d(torch.ones(1, 4, 2, 2, dtype=be.param_dtype),
                                           w.reshape(4, 4, 1, 1))
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"precision={precision} does not run on this CPU build: {e}")
    if y.dtype != be.compute_dtype or z.dtype != be.compute_dtype:
        pytest.skip(f"precision={precision}: CPU autocast computes {y.dtype}, not {be.compute_dtype}")
    return be


def under_policy(be: backend.Backend, fn, params, batch, input_keys=("image",)):
    """``fn(params, batch)`` as the train step runs it: O2 parameters in their low dtype
    (``create_state``), the image inputs cast (``cast_inputs``), the forward under
    ``autocast``."""
    params = tree.to(params, dtype=be.param_dtype)
    batch = be.cast_inputs(batch, input_keys)
    with torch.no_grad(), be.autocast():
        return fn(params, batch)


def assert_close_to_fp32(value, fp32_value, precision):
    value, ref = float(value), float(fp32_value)
    assert math.isfinite(value) and value != 0.0, (precision, value)
    assert abs(value / ref - 1) < RTOL[precision], (precision, value, ref)


# ---------------------------------------------------------------------------- SimMIM


@pytest.fixture(scope="module")
def simmim_case():
    """A one-block ViT SimMIM on three 224-px images: 3 x 30 mask patches of 32 x 32
    pixels = 92,160 masked pixel positions (> 65,504)."""
    cfg = simmim.config("vit", encoder=dict(embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0))
    gen = torch.Generator().manual_seed(0)
    params = simmim.init(gen, cfg)
    mask = torch.stack([masks.simmim_mask(gen, input_size=224, mask_patch_size=32, model_patch_size=16,
                                          mask_ratio=cfg.mask_ratio) for _ in range(3)])
    batch = {"image": torch.randn(3, 3, 224, 224, generator=gen), "mask": mask}
    config = ml_collections.ConfigDict({"model": cfg})
    masked = simmim.pixel_mask(mask, simmim.patch_size(cfg)).sum().item()
    assert masked > FP16_MAX
    fp32 = under_policy(backend.setup("cpu", "fp32", "off"),
                        lambda p, b: simmim.apply(p, b["image"], cfg, train=True, mask=b["mask"]),
                        params, batch)
    return cfg, config, params, batch, masked, fp32


def test_simmim_fp32_loss_is_the_masked_l1(simmim_case):
    """The reference value itself: sum of |x - x_rec| over masked pixels and channels,
    divided by the masked positions and the channels, in float64."""
    cfg, _, _, batch, masked, (loss, aux) = simmim_case
    m = simmim.pixel_mask(batch["mask"], 16).double()
    l1 = (batch["image"].double() - aux["reconstruction"].double()).abs()
    expected = (l1 * m).sum() / masked / 3
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("precision", POLICIES)
def test_simmim_loss_under_policy_is_the_fp32_loss(simmim_case, precision):
    cfg, config, params, batch, masked, (fp32_loss, _) = simmim_case
    be = policy(precision)
    loss = under_policy(be, lambda p, b: simmim_pretrain.loss(p, {}, b, config, train=True)[0],
                        params, batch)
    assert loss.dtype == torch.float32, loss.dtype
    assert_close_to_fp32(loss, fp32_loss, precision)
    sums = under_policy(be, lambda p, b: simmim_pretrain.evaluate(p, {}, b, config), params, batch)
    assert float(sums["masked_pixels"]) == masked
    assert_close_to_fp32(sums["l1_sum"] / sums["masked_pixels"], fp32_loss, precision)


# ---------------------------------------------------------------------------- MAE


@pytest.fixture(scope="module")
def mae_case():
    """A one-block MAE on 1,200 16-px images of 2-px patches, 58 of 64 patches removed
    per image: 69,600 masked patches (> 65,504); normalised pixel targets, as the recipe.
    Narrow and at a high mask ratio, as CPUs multiply fp16 matrices slowly."""
    cfg = mae.config(img_size=16, patch_size=2, embed_dim=8, depth=1, num_heads=2, mlp_ratio=1.0,
                     decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2, mask_ratio=0.9,
                     norm_pix_loss=True)
    gen = torch.Generator().manual_seed(0)
    params = mae.init(gen, cfg)
    n = 1200
    batch = {"image": torch.randn(n, 3, 16, 16, generator=gen), "noise": mae.noise(gen, n, cfg)}
    config = ml_collections.ConfigDict({"model": cfg})
    masked = n * (mae.num_patches(cfg) - mae.len_keep(cfg))
    assert masked > FP16_MAX
    fp32 = under_policy(backend.setup("cpu", "fp32", "off"),
                        lambda p, b: mae.apply(p, b["image"], b["noise"], cfg), params, batch)
    return cfg, config, params, batch, masked, fp32


def test_mae_fp32_loss_is_the_masked_mse(mae_case):
    """The reference value itself: the per-patch MSE against the normalised patch
    pixels, averaged over the removed patches, in float64."""
    cfg, _, _, batch, masked, (loss, aux) = mae_case
    t = mae.patchify(batch["image"].double(), cfg.patch_size)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((aux["pred"].double() - t) ** 2).mean(-1)
    assert float(aux["mask"].double().sum()) == masked
    expected = (per_patch * aux["mask"].double()).sum() / masked
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("precision", POLICIES)
def test_mae_loss_under_policy_is_the_fp32_loss(mae_case, precision):
    cfg, config, params, batch, masked, (fp32_loss, _) = mae_case
    be = policy(precision)
    loss = under_policy(be, lambda p, b: mae_pretrain.loss(p, {}, b, config, train=True)[0],
                        params, batch)
    assert loss.dtype == torch.float32, loss.dtype
    assert_close_to_fp32(loss, fp32_loss, precision)
    sums = under_policy(be, lambda p, b: mae_pretrain.evaluate(p, {}, b, config), params, batch)
    assert float(sums["masked_patches"]) == masked
    assert_close_to_fp32(sums["loss_sum"] / sums["masked_patches"], fp32_loss, precision)


# ---------------------------------------------------------------------------- the loss functions


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loss_functions_reduce_low_precision_inputs_in_fp32(dtype):
    """Inputs, predictions and masks all in a low dtype (O2 without autocast): the losses
    equal float64 reductions of the same values."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 256, 256, generator=gen).to(dtype)
    rec = torch.randn(2, 3, 256, 256, generator=gen).to(dtype)
    grid = (torch.rand(2, 8, 8, generator=gen) < 0.6).to(dtype)   # 32-px patches
    m = simmim.pixel_mask(grid, 32).double()
    assert m.sum() > FP16_MAX
    expected = ((x.double() - rec.double()).abs() * m).sum() / m.sum() / 3
    got = simmim.reconstruction_loss(x, rec, grid, 32)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(expected), rel=1e-5)

    imgs = torch.randn(1100, 3, 16, 16, generator=gen).to(dtype)
    pred = torch.randn(1100, 64, 12, generator=gen).to(dtype)          # 2-px patches
    mask = (torch.rand(1100, 64, generator=gen) < 0.95).to(dtype)
    assert mask.double().sum() > FP16_MAX
    per_patch = ((pred.double() - mae.patchify(imgs.double(), 2)) ** 2).mean(-1)
    expected = (per_patch * mask.double()).sum() / mask.double().sum()
    got = mae.loss(imgs, pred, mask, norm_pix_loss=False)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
