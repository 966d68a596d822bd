"""Reconstruction grids: layout, pasted visible patches, PNG writing."""
import numpy as np
import pytest
import torch
from PIL import Image

from mim.models import mae
from mim.visualize import IMAGENET_MEAN, IMAGENET_STD, denormalize_pix, reconstruction_grid, save_grid

B, C, H, W, P, PAD = 2, 3, 32, 32, 8, 2


def setup():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(B, C, H, W, generator=g)
    pred = torch.randn(B, (H // P) * (W // P), P * P * C, generator=g)
    mask = (torch.rand(B, 16, generator=g) < 0.75).float()
    return imgs, pred, mask


def cell(grid, row, col):
    top, left = PAD + row * (H + PAD), PAD + col * (W + PAD)
    return grid[top:top + H, left:left + W]


def pixel_mask(mask):
    return mask.reshape(B, H // P, W // P).repeat_interleave(P, 1).repeat_interleave(P, 2).bool().numpy()


def test_grid_layout_and_pasted_column():
    imgs, pred, mask = setup()
    grid = reconstruction_grid(imgs, pred, mask, P, pad=PAD)
    assert grid.dtype == np.uint8 and grid.shape == (B * H + 3 * PAD, 4 * W + 5 * PAD, 3)
    m = pixel_mask(mask)
    mean_colour = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    for r in range(B):
        original, masked, recon, pasted = (cell(grid, r, c) for c in range(4))
        # Independent un-normalisation of the original.
        want = imgs[r].permute(1, 2, 0).numpy() * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        want = np.clip(np.round(want * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(original, want)
        assert np.array_equal(pasted[~m[r]], original[~m[r]])
        assert np.array_equal(pasted[m[r]], recon[m[r]])
        assert np.array_equal(masked[~m[r]], original[~m[r]])
        assert np.all(masked[m[r]] == mean_colour)
    assert np.all(grid[:PAD] == 255) and np.all(grid[:, :PAD] == 255)


def test_pred_images_equals_pred_patches():
    imgs, pred, mask = setup()
    a = reconstruction_grid(imgs, pred, mask, P)
    b = reconstruction_grid(imgs, mask=mask, patch_size=P, pred_images=mae.unpatchify(pred, P))
    assert np.array_equal(a, b)
    # SimMIM style: full-image prediction with a coarser mask grid, given as (B, h, w).
    coarse = torch.tensor([[[1.0, 0], [0, 1]], [[0, 0], [1, 0]]])
    grid = reconstruction_grid(imgs, mask=coarse, patch_size=16, pred_images=torch.zeros_like(imgs))
    assert grid.shape == (B * H + 3 * PAD, 4 * W + 5 * PAD, 3)
    with pytest.raises(ValueError, match="exactly one"):
        reconstruction_grid(imgs, pred, mask, P, pred_images=imgs)
    with pytest.raises(ValueError, match="mask"):
        reconstruction_grid(imgs, pred, mask[:, :5], P)


def test_denormalize_pix_inverts_norm_pix_target():
    imgs, _, _ = setup()
    normalised = mae.target(imgs, P, norm_pix_loss=True)
    torch.testing.assert_close(denormalize_pix(normalised, imgs, P), mae.patchify(imgs, P),
                               atol=1e-4, rtol=1e-4)


def test_save_grid_writes_png(tmp_path):
    imgs, pred, mask = setup()
    grid = reconstruction_grid(imgs, pred, mask, P, pad=PAD)
    path = tmp_path / "recon" / "step_100.png"
    save_grid(path, grid)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (4 * W + 5 * PAD, B * H + 3 * PAD)
        assert np.array_equal(np.asarray(im), grid)
    assert [p.name for p in path.parent.iterdir()] == ["step_100.png"]
