"""Mask generators for masked image modeling, as pure functions of a ``torch.Generator``.

The input pipeline draws masks and ships them in the batch, so a train step stays a
deterministic function of its inputs (DESIGN.md, "Randomness is explicit").
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch


def simmim_mask_count(input_size: int, mask_patch_size: int, mask_ratio: float) -> int:
    """Number of masked mask-patches: ``ceil(ratio * count)``, as SimMIM's
    ``MaskGenerator`` (36 mask patches at 192 px / 32 px, 0.6 -> 22)."""
    tokens = (input_size // mask_patch_size) ** 2
    return int(math.ceil(tokens * mask_ratio))


def simmim_mask(gen: torch.Generator, input_size: int = 192, mask_patch_size: int = 32,
                model_patch_size: int = 4, mask_ratio: float = 0.6) -> torch.Tensor:
    """SimMIM random masking (Xie et al. 2022 Sec. 3.1): a uniformly random set of
    ``ceil(ratio * (input / mask_patch)^2)`` mask patches of ``mask_patch_size`` pixels,
    returned at the model's patch grid as a ``(input/model_patch, input/model_patch)``
    int64 tensor of 0/1 (1 = masked), like ``data_simmim.MaskGenerator``."""
    return simmim_masks(gen, 1, input_size, mask_patch_size, model_patch_size, mask_ratio)[0]


def simmim_masks(gen: torch.Generator, batch: int, input_size: int = 192, mask_patch_size: int = 32,
                 model_patch_size: int = 4, mask_ratio: float = 0.6) -> torch.Tensor:
    """``(batch, input/model_patch, input/model_patch)`` independent SimMIM masks."""
    if input_size % mask_patch_size:
        raise ValueError(f"input_size={input_size} is not divisible by mask_patch_size={mask_patch_size}")
    if mask_patch_size % model_patch_size:
        raise ValueError(f"mask_patch_size={mask_patch_size} is not divisible by "
                         f"model_patch_size={model_patch_size}")
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} is not in [0, 1]")
    side = input_size // mask_patch_size
    count = simmim_mask_count(input_size, mask_patch_size, mask_ratio)
    # Ranks of i.i.d. uniforms give one random permutation per sample, drawn in one call.
    ranks = torch.rand(batch, side * side, generator=gen).argsort(dim=1).argsort(dim=1)
    mask = (ranks < count).long().view(batch, side, side)
    scale = mask_patch_size // model_patch_size
    return mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Integer in ``[lo, hi]``, both ends included (Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=gen).item())


def _add_block(gen, mask: torch.Tensor, max_new: int, min_num_patches: int,
               log_aspect: Tuple[float, float]) -> int:
    """One attempt (up to 10 tries) at masking a random rectangle that adds between 1 and
    ``max_new`` new patches; returns how many it added (BEiT ``MaskingGenerator._mask``)."""
    H, W = mask.shape
    for _ in range(10):
        area = _uniform(gen, min_num_patches, max_new)
        aspect = math.exp(_uniform(gen, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < W and h < H:
            top = _randint(gen, 0, H - h)
            left = _randint(gen, 0, W - w)
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= max_new:
                region.fill_(1)
                return new
    return 0


def beit_block_mask(gen: torch.Generator, grid: Union[int, Tuple[int, int]] = 14,
                    num_masking_patches: int = 75, min_num_patches: int = 16,
                    max_num_patches: Optional[int] = None, min_aspect: float = 0.3,
                    max_aspect: Optional[float] = None) -> torch.Tensor:
    """BEiT blockwise masking (Bao et al. 2022 Alg. 1; unilm/beit ``MaskingGenerator``):
    add random rectangles of at least ``min_num_patches`` patches, aspect ratio log-uniform
    in ``[min_aspect, 1/min_aspect]``, until ``num_masking_patches`` are masked (75 of 196,
    ~40%, at 224 px). As in the reference it stops early if ten tries add nothing, so the
    count can fall short. Returns a ``(H, W)`` int64 0/1 tensor."""
    H, W = (grid, grid) if isinstance(grid, int) else grid
    if num_masking_patches > H * W:
        raise ValueError(f"num_masking_patches={num_masking_patches} exceeds the {H}x{W} grid")
    max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect))
    mask = torch.zeros(H, W, dtype=torch.long)
    count = 0
    while count < num_masking_patches:
        max_new = min(num_masking_patches - count, max_num_patches)
        delta = _add_block(gen, mask, max_new, min_num_patches, log_aspect)
        if delta == 0:
            break
        count += delta
    return mask


def random_patch_mask(gen: torch.Generator, grid: Union[int, Tuple[int, int]] = 14,
                      num_masking_patches: int = 75) -> torch.Tensor:
    """``num_masking_patches`` patches drawn uniformly without replacement: BEiT's
    "w/o blockwise masking" ablation (Bao et al. 2022, Table 4: random masking at the same
    40% ratio). Returns a ``(H, W)`` int64 0/1 tensor."""
    H, W = (grid, grid) if isinstance(grid, int) else grid
    if not 1 <= num_masking_patches <= H * W:
        raise ValueError(f"num_masking_patches={num_masking_patches}: must be in 1..{H * W} "
                         f"(the {H}x{W} grid)")
    mask = torch.zeros(H * W, dtype=torch.long)
    mask[torch.randperm(H * W, generator=gen)[:num_masking_patches]] = 1
    return mask.view(H, W)


def beit_block_masks(gen: torch.Generator, batch: int, grid: Union[int, Tuple[int, int]] = 14,
                     **kwargs) -> torch.Tensor:
    """``(batch, H, W)`` independent BEiT block masks."""
    return torch.stack([beit_block_mask(gen, grid, **kwargs) for _ in range(batch)])


def check_beit_mask(grid: Union[int, Tuple[int, int]] = 14, num_masking_patches: int = 75,
                    min_num_patches: int = 16, max_num_patches: Optional[int] = None,
                    min_aspect: float = 0.3, max_aspect: Optional[float] = None) -> None:
    """Refuse block-mask settings under which :func:`beit_block_mask` often returns an
    EMPTY mask, whose masked-token loss is 0/0 (the reference's NaN of unilm issue 551,
    ``--num_mask_patches 1``): the first block draws its area between
    ``min_num_patches`` and ``min(num_masking_patches, max_num_patches)`` and must fit that
    budget and the grid, else ten failed tries end the mask. With fewer patches than the
    minimum block (1 of 16: ~78% of masks empty; 10 of 16: ~12%) it mostly cannot. At
    75 of 196 with blocks of at least 16, an empty mask has probability ~1e-12."""
    H, W = (grid, grid) if isinstance(grid, int) else grid
    budget = num_masking_patches if max_num_patches is None else min(num_masking_patches, max_num_patches)
    if num_masking_patches < 1:
        raise ValueError(f"num_masking_patches={num_masking_patches}: must be at least 1")
    if num_masking_patches > H * W:
        raise ValueError(f"num_masking_patches={num_masking_patches} exceeds the {H}x{W} grid")
    if min_num_patches < 1:
        raise ValueError(f"min_num_patches={min_num_patches}: must be at least 1")
    if budget < min_num_patches:
        raise ValueError(
            f"num_masking_patches={num_masking_patches} (max_num_patches={max_num_patches}) is "
            f"below min_num_patches={min_num_patches}: blocks drawn with at least "
            f"{min_num_patches} patches rarely fit a budget of {budget}, so many masks come out "
            f"empty and the masked-token loss is 0/0 (unilm issue 551); lower min_num_patches "
            f"or mask more patches")
    if min_num_patches > (H - 1) * (W - 1):
        raise ValueError(f"min_num_patches={min_num_patches}: a block must be smaller than the "
                         f"{H}x{W} grid on both sides ((H-1)(W-1) = {(H - 1) * (W - 1)} patches)")
    hi = max_aspect or 1.0 / min_aspect
    if not 0 < min_aspect <= hi:
        raise ValueError(f"block aspect range [{min_aspect}, {hi}]: must satisfy 0 < min <= max")
