"""SimMIM pretraining (Xie et al., 2022): regress the raw pixels of randomly masked
32-px patches with an L1 loss, from an encoder that sees a mask token in their place.

The per-image mask is drawn by the input pipeline (``batch_extras``), as the reference's
``SimMIMTransform`` does in its data loader, so the step is a deterministic function of
its batch. The mask geometry comes from the model config (``model.mask_patch_size``,
``model.mask_ratio``, the encoder's patch size) and the input size from
``data.image_size``. ``evaluate`` reports the same masked L1 on the eval split, whose masks
are fixed per image (the eval sampler seeds every image from its index), so eval losses of
different steps and runs are comparable.
"""
from __future__ import annotations


import torch

from mim import visualize
from mim.config import ConfigError
from mim.data import masks
from mim.models import simmim
from mim.tasks import ParamRules, model_rules



def check(config) -> None:
    """What :func:`mim.config.validate` cannot see inside a SimMIM model config."""
    m = config.model
    if m.get("name") != "simmim":
        raise ConfigError(f"config.model.name: simmim_pretrain needs a SimMIM model "
                          f"(mim.models.simmim.config), got {m.get('name')!r}")
    size, enc = config.data.image_size, m.encoder
    if enc.img_size != size:
        raise ConfigError(f"config.model.encoder.img_size: {enc.img_size} differs from "
                          f"data.image_size={size}")
    if size % m.mask_patch_size or m.mask_patch_size % enc.patch_size:
        raise ConfigError(f"config.model.mask_patch_size: {m.mask_patch_size} must divide "
                          f"data.image_size={size} and be a multiple of the encoder's "
                          f"patch_size={enc.patch_size} (data_simmim.MaskGenerator)")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"config.model.mask_ratio: must be in (0, 1), got {m.mask_ratio}")
    if "recon" in config:
        r = config.recon
        if not (isinstance(r.every, int) and r.every >= 0):
            raise ConfigError(f"config.recon.every: must be a non-negative integer, got {r.every!r}")
        if not (isinstance(r.num_images, int) and r.num_images > 0):
            raise ConfigError(f"config.recon.num_images: must be a positive integer, got {r.num_images!r}")


def init(config, gen: torch.Generator):
    check(config)
    return simmim.init(gen, config.model), {}


def loss(params, model_state, batch, config, train: bool, frozen=None):
    value, _ = simmim.apply(params, batch["image"], config.model, train=train,
                            mask=batch["mask"])
    return value, (model_state, {})


def evaluate(params, model_state, batch, config, frozen=None):
    """Sums of the L1 over masked pixels (per channel) and of masked pixel positions, so
    the split's loss weights every masked pixel equally whatever the batch split."""
    x = batch["image"]
    _, aux = simmim.apply(params, x, config.model, mask=batch["mask"])
    m = simmim.pixel_mask(batch["mask"], simmim.patch_size(config.model)).to(torch.float32)
    l1 = (x.float() - aux["reconstruction"].float()).abs()
    return {"l1_sum": (l1 * m).sum().double() / x.shape[1], "masked_pixels": m.sum().double(),
            "count": torch.tensor(x.shape[0], device=x.device)}


def summarize(sums):
    return {"loss": sums["l1_sum"] / max(sums["masked_pixels"], 1.0), "count": int(sums["count"])}


def param_rules(config) -> ParamRules:
    """The model's rules (:func:`mim.models.simmim.no_weight_decay`: the reference's
    ``build_pretrain_optimizer`` exemptions); no layer decay while pretraining."""
    r = model_rules(config.model)
    return ParamRules(no_decay=r.no_decay)


def mask_for(gen: torch.Generator, config) -> torch.Tensor:
    """One ``(H/p, W/p)`` 0/1 mask at the encoder's patch grid (1 = masked)."""
    m = config.model
    return masks.simmim_mask(gen, input_size=config.data.image_size,
                             mask_patch_size=m.mask_patch_size,
                             model_patch_size=simmim.patch_size(m), mask_ratio=m.mask_ratio)


def batch_extras(gen: torch.Generator, config):
    return {"mask": mask_for(gen, config)}


# ----------------------------------------------------------------------------------------
# Reconstruction pictures during training.


def fixed_masks(config, num: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.seed)
    return torch.stack([mask_for(gen, config) for _ in range(num)])


def reconstruct(params, images: torch.Tensor, mask: torch.Tensor, config):
    """Grid (uint8 HWC) of original | masked | prediction | prediction on the masked
    patches pasted into the original. SimMIM predicts every pixel, but only the masked
    ones are trained (Sec. 3.4), so the last column is the one to judge."""
    with torch.no_grad():
        _, aux = simmim.apply(params, images, config.model, mask=mask)
    return visualize.reconstruction_grid(
        images, mask=mask, patch_size=simmim.patch_size(config.model),
        pred_images=aux["reconstruction"].float(),
        mean=tuple(config.data.mean), std=tuple(config.data.std))


def hooks(setup, writer):
    if "recon" not in setup.config:
        return None
    c = setup.config
    return visualize.ReconstructionHook(
        setup, writer, lambda config, n: {"mask": fixed_masks(config, n)},
        lambda params, images, mask: reconstruct(params, images, mask, c))
