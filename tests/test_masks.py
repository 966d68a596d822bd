"""Mask generators: SimMIM random mask-patch masks and BEiT blockwise masks."""
import math

import pytest
import torch

from mim.data import masks


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_simmim_mask_shape_count_and_blocks():
    m = masks.simmim_mask(gen(0), 192, 32, 4, 0.6)
    assert m.shape == (48, 48) and m.dtype == torch.long
    assert set(m.unique().tolist()) <= {0, 1}
    # 36 mask patches at ratio 0.6 -> ceil(21.6) = 22 masked, each 8x8 model patches.
    assert masks.simmim_mask_count(192, 32, 0.6) == 22
    assert m.sum().item() == 22 * 64
    coarse = m.view(6, 8, 6, 8)
    assert torch.equal(coarse.amin(dim=(1, 3)), coarse.amax(dim=(1, 3)))   # constant per 32-px block


def test_simmim_vit_setting():
    m = masks.simmim_mask(gen(0), 224, 32, 16, 0.6)
    assert m.shape == (14, 14)
    assert m.view(7, 2, 7, 2).amax(dim=(1, 3)).sum().item() == math.ceil(49 * 0.6) == 30


def test_simmim_masks_batched_deterministic_and_seed_dependent():
    a = masks.simmim_masks(gen(1), 8, 192, 32, 4, 0.6)
    b = masks.simmim_masks(gen(1), 8, 192, 32, 4, 0.6)
    c = masks.simmim_masks(gen(2), 8, 192, 32, 4, 0.6)
    assert a.shape == (8, 48, 48)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(dim=(1, 2)) == 22 * 64).all()
    assert len({tuple(x.flatten().tolist()) for x in a}) == 8     # samples differ


def test_simmim_positions_are_uniform():
    counts = masks.simmim_masks(gen(0), 2000, 64, 32, 32, 0.5).float().mean(0)
    assert counts.shape == (2, 2)
    assert torch.allclose(counts, torch.full((2, 2), 0.5), atol=0.05)


def test_simmim_bad_sizes():
    with pytest.raises(ValueError, match="mask_patch_size=32"):
        masks.simmim_mask(gen(0), 200, 32, 4, 0.6)
    with pytest.raises(ValueError, match="model_patch_size=5"):
        masks.simmim_mask(gen(0), 192, 32, 5, 0.6)
    with pytest.raises(ValueError, match="mask_ratio"):
        masks.simmim_mask(gen(0), 192, 32, 4, 1.5)


def test_beit_block_mask_count_shape_and_determinism():
    counts = []
    for seed in range(40):
        m = masks.beit_block_mask(gen(seed), 14, 75, 16)
        assert m.shape == (14, 14) and m.dtype == torch.long
        counts.append(m.sum().item())
    # Like the reference, it stops short when ten tries add nothing. Over 2000 draws the
    # reference (Python random) gave mean 74.50, 69% exactly 75, min 66; this gave
    # 74.46, 66%, 66.
    assert max(counts) == 75 and min(counts) >= 60
    assert sum(counts) / len(counts) > 73
    assert torch.equal(masks.beit_block_mask(gen(3)), masks.beit_block_mask(gen(3)))
    assert not torch.equal(masks.beit_block_mask(gen(3)), masks.beit_block_mask(gen(4)))


def test_beit_block_masks_are_blocky():
    """Masked patches cluster in rectangles: many more masked 4-neighbours than a random
    75-of-196 mask would have."""
    m = masks.beit_block_masks(gen(0), 16, (14, 14)).float()
    assert m.shape == (16, 14, 14)
    neighbours = (m[:, 1:, :] * m[:, :-1, :]).sum() + (m[:, :, 1:] * m[:, :, :-1]).sum()
    random_expect = 16 * 2 * 13 * 14 * (75 / 196) * (74 / 195)
    assert neighbours > 1.5 * random_expect


def test_beit_rejects_too_many_patches():
    with pytest.raises(ValueError, match="exceeds"):
        masks.beit_block_mask(gen(0), 4, 20)


def test_random_patch_mask_masks_exactly_the_count_uniformly():
    """BEiT's Table 4 ablation: num_masking_patches positions, each equally likely."""
    from mim.data.masks import random_patch_mask
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([random_patch_mask(gen, 8, 25) for _ in range(4000)])
    assert draws.shape == (4000, 8, 8) and (draws.flatten(1).sum(1) == 25).all()
    freq = draws.float().mean(0)
    # each of the 64 positions is masked with probability 25/64; 4000 draws: sd 0.0077
    assert (freq - 25 / 64).abs().max() < 0.04
    with pytest.raises(ValueError, match="must be in 1..64"):
        random_patch_mask(gen, 8, 65)


def test_beit_mask_mode_reaches_the_batch_and_is_checked():
    from conftest import experiment
    from mim.config import ConfigError
    from mim.tasks import beit_pretrain
    c = experiment("beit_base", "tiny", **{"mask.mode": "random"})
    mask = beit_pretrain.batch_extras(torch.Generator().manual_seed(1), c)["mask"]
    assert mask.sum() == c.mask.num_masking_patches
    c.mask.mode = "grid"
    with pytest.raises(ConfigError, match="config.mask.mode='grid'"):
        beit_pretrain.check(c)
