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


# ----------------------------------------------------------------------------------------
# python -m mim.reconstruct


def _simmim_run(workdir):
    """A mim simmim_pretrain checkpoint of the :tiny Swin, as the loop writes one (the
    model's own init: what is drawn does not need training)."""
    import json
    import os

    from conftest import experiment
    from mim import tree
    from mim.checkpoints import io
    from mim.models import simmim
    c = experiment("simmim_swin_base", "tiny")
    params = simmim.init(torch.Generator().manual_seed(0), c.model)
    io.save(os.path.join(workdir, "checkpoints"), 1, {"params": params},
            {"config": json.loads(c.to_json_best_effort())}, keep=1)
    return c, params, tree


def _image_folder(root, n=3):
    import os
    import shutil

    from conftest import BUNDLED
    src = os.path.join(BUNDLED, "val", "cat")
    os.makedirs(root)
    for f in sorted(os.listdir(src))[:n]:
        shutil.copy(os.path.join(src, f), root)
    open(os.path.join(root, "0_empty.jpg"), "wb").close()          # unreadable, sorted first
    with open(os.path.join(root, "1_text.png"), "w") as f:
        f.write("not an image")
    return src


def test_reconstruct_draws_simmim_runs_and_skips_unreadable_files(tmp_path):
    """A SimMIM workdir draws (it used to stop at 'cannot tell the checkpoint layout'); two
    unreadable files are skipped and counted. Reference: the grid of the model's own
    prediction under the masks drawn as SimMIM's MaskGenerator (independent re-statement of
    the mask: ceil(0.6 * 16) = 10 of the 4x4 8-px mask patches of a 32-px image)."""
    import os

    from mim import reconstruct, visualize
    from mim.models import simmim
    c, params, _ = _simmim_run(str(tmp_path / "run"))
    images = str(tmp_path / "images")
    _image_folder(images)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        grid, skipped = reconstruct.make_grid(str(tmp_path / "run"), images, str(tmp_path / "g.png"),
                                              max_images=3, seed=5, return_skipped=True)
    assert skipped == 2 and grid.shape == (3 * 32 + 4 * PAD, 4 * 32 + 5 * PAD, 3)
    assert os.path.exists(tmp_path / "g.png")
    x, _ = reconstruct.read_images(images, 32, c.data.mean, c.data.std, 3)
    masked_cells = []
    for r in range(3):
        top = PAD + r * (32 + PAD)
        original = grid[top:top + 32, PAD:PAD + 32]
        masked = grid[top:top + 32, 2 * PAD + 32:2 * PAD + 64]
        m = np.any(masked != original, axis=-1)                 # pixels the mask removed
        blocks = m.reshape(4, 8, 4, 8).any(axis=(1, 3))
        assert blocks.sum() == 10, blocks
        # whole 8-px blocks are removed (a pixel may equal the mean colour by chance)
        assert m[blocks.repeat(8, 0).repeat(8, 1)].mean() > 0.9
        masked_cells.append(blocks)
        # the reconstruction column is the model's output on the masked input
        mask = torch.from_numpy(blocks.repeat(2, 0).repeat(2, 1)).long()[None]   # 4-px patch grid
        with torch.no_grad():
            _, aux = simmim.apply(params, x[r:r + 1], c.model, mask=mask)
        want = visualize._to_uint8(aux["reconstruction"].float(), tuple(c.data.mean), tuple(c.data.std))[0]
        got = grid[top:top + 32, 3 * PAD + 64:3 * PAD + 96]
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert not all(np.array_equal(masked_cells[0], b) for b in masked_cells[1:])  # a mask per image


def test_reconstruct_lists_the_layouts_it_accepts(tmp_path):
    from safetensors.torch import save_file

    from mim import reconstruct
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    images = str(tmp_path / "images")
    _image_folder(images, n=1)
    with pytest.raises(ValueError, match="Accepted: .*mae_pretrain.*simmim_pretrain.*official MAE"):
        reconstruct.make_grid(str(tmp_path / "other.safetensors"), images, str(tmp_path / "g.png"))
