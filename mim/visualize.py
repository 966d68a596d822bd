"""Reconstruction figures for masked image modelling, as in MAE's demo notebook
(He et al. 2022, Fig. 2-3): per image, original | masked | reconstruction |
reconstruction with the visible patches pasted back.

Generic over the model: predictions come as patch vectors (MAE's decoder output,
``(B, L, p*p*C)``) or as full images (SimMIM's pixel-shuffle output).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from mim.models.mae import patchify, unpatchify

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize_pix(pred: torch.Tensor, imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """Map predictions of a model trained with ``norm_pix_loss`` (targets normalised by
    each patch's own mean and variance, MAE Sec. 3) back to the input's pixel space,
    using the statistics of the true patches."""
    t = patchify(imgs, patch)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return pred * (var + 1e-6) ** 0.5 + mean


def _pixel_mask(mask: torch.Tensor, shape, patch: int) -> torch.Tensor:
    """``(B, L)`` or ``(B, h, w)`` patch mask (1 = removed) -> ``(B, 1, H, W)`` bool."""
    B, _, H, W = shape
    h, w = H // patch, W // patch
    if mask.numel() != B * h * w:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not cover a {h}x{w} grid "
                         f"of {patch}-px patches for {B} images")
    m = mask.reshape(B, h, w).bool()
    m = m.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    return m.unsqueeze(1)


def _to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised ``(B, C, H, W)`` -> uint8 ``(B, H, W, C)`` after undoing the input
    normalisation."""
    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    x = ((x * std + mean) * 255.0).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def reconstruction_grid(images: torch.Tensor, pred_patches: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, patch_size: int = 16,
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                        *, pred_images: Optional[torch.Tensor] = None, pad: int = 2) -> np.ndarray:
    """uint8 ``(H', W', C)`` array with one row per image and four columns.

    ``images``: normalised ``(B, C, H, W)`` model inputs. ``pred_patches``: ``(B, L, q*q*C)``
    in :func:`mim.models.mae.patchify` order, or ``pred_images``: ``(B, C, H, W)``, both in
    the same normalised space as ``images``. ``mask``: 1 = removed, per ``patch_size``-px
    patch, ``(B, L)`` or ``(B, h, w)``. Removed patches show as the mean colour (zero in
    normalised space), as in the demo notebook. Cells are separated by ``pad`` white pixels."""
    if (pred_patches is None) == (pred_images is None):
        raise ValueError("pass exactly one of pred_patches and pred_images")
    if mask is None:
        raise ValueError("mask is required")
    x = images.detach().float().cpu()
    B, C, H, W = x.shape
    if pred_images is None:
        pred = pred_patches.detach().float().cpu()
        q = math.isqrt(pred.shape[-1] // C)
        if q * q * C != pred.shape[-1]:
            raise ValueError(f"pred_patches of size {pred.shape[-1]} are not q*q*{C} pixels")
        y = unpatchify(pred, q, grid=(H // q, W // q))
    else:
        y = pred_images.detach().float().cpu()
    if y.shape != x.shape:
        raise ValueError(f"prediction of shape {tuple(y.shape)} does not match images {tuple(x.shape)}")
    m = _pixel_mask(mask.detach().cpu(), x.shape, patch_size)
    columns = [x, torch.where(m, torch.zeros_like(x), x), y, torch.where(m, y, x)]
    cells = [_to_uint8(c, mean, std) for c in columns]

    canvas = np.full((B * H + (B + 1) * pad, len(cells) * W + (len(cells) + 1) * pad, C),
                     255, dtype=np.uint8)
    for r in range(B):
        top = pad + r * (H + pad)
        for c, cell in enumerate(cells):
            left = pad + c * (W + pad)
            canvas[top:top + H, left:left + W] = cell[r]
    return canvas


def save_grid(path, image) -> None:
    """Write a PNG atomically (temporary file, then rename), so a reader never sees a
    half-written image."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        image = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def fixed_images(config, num: int, device="cpu") -> torch.Tensor:
    """``num`` eval-split images spread evenly over the split (so over its classes), with
    the eval transform, normalised on ``device`` as the loader's batches are: the same
    pictures at every step and in every run."""
    from mim.data import pipeline
    ds = pipeline.eval_dataset(config)
    idx = [i * len(ds) // num for i in range(min(num, len(ds)))]
    batch = pipeline.collate(config)([ds[(i, 0)] for i in idx])
    return pipeline.to_device(batch, device, config.data, train=False)["image"]


class ReconstructionHook:
    """Every ``config.recon.every`` steps on rank 0: ``reconstructions/step_XXXXXXXX.png``
    under the workdir and the same picture in TensorBoard (tag ``reconstruction``).

    ``fixed_inputs(config, num) -> {name: tensor}`` draws the masking inputs once (MAE
    noise, SimMIM masks); ``picture(params, images, **inputs) -> uint8 HWC`` draws the
    grid, so every picture of a run shows the same images under the same masks."""

    def __init__(self, setup, writer, fixed_inputs, picture):
        from mim import tree
        c = setup.config
        self.every, self.writer, self.picture, self.to_fp32 = c.recon.every, writer, picture, tree.to
        self.enabled = setup.be.is_main and self.every > 0
        self.dir = os.path.join(setup.workdir, "reconstructions")
        if self.enabled:
            self.images = fixed_images(c, c.recon.num_images, setup.be.device)
            self.inputs = {k: v.to(setup.be.device)
                           for k, v in fixed_inputs(c, self.images.shape[0]).items()}

    def due(self, step: int) -> bool:
        """Whether ``step`` draws a picture (the same answer on every rank, which must
        then all call :meth:`after_step` with the whole parameters)."""
        return self.every > 0 and step % self.every == 0

    def after_step(self, step: int, params, batch, metrics):
        if not self.enabled or not self.due(step):
            return
        # fp32 for the picture, whatever precision the run trains in.
        params = self.to_fp32(params, dtype=torch.float32)
        grid = self.picture(params, self.images, **self.inputs)
        path = os.path.join(self.dir, f"step_{step:08d}.png")
        save_grid(path, grid)
        self.writer.image("reconstruction", grid, step)
        log.info("wrote %s", path)
