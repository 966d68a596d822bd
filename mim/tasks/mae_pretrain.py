"""MAE pretraining (He et al. 2022): reconstruct the pixels of randomly masked patches.

The per-sample masking noise is drawn by the input pipeline (``batch_extras``), so the
step is a deterministic function of its batch. ``evaluate`` reports the same masked-patch
loss on the eval split, whose noise is fixed per image (the eval sampler seeds every image
from its index), so eval losses of different steps are comparable.
"""
from __future__ import annotations


import torch

from mim import visualize
from mim.models import mae
from mim.tasks import ParamRules, model_rules



def init(config, gen: torch.Generator):
    return mae.init(gen, config.model), {}


def loss(params, model_state, batch, config, train: bool, frozen=None):
    value, _ = mae.apply(params, batch["image"], batch["noise"], config.model, train=train)
    return value, (model_state, {})


def evaluate(params, model_state, batch, config, frozen=None):
    value, aux = mae.apply(params, batch["image"], batch["noise"], config.model)
    # The mask has the activations' dtype; counted in fp16 (largest value 65,504) a large
    # eval batch would overflow, so count in fp32 and sum over the split in fp64.
    masked = aux["mask"].float().sum().double()
    # Sums, so that the mean over the split weights every masked patch equally.
    return {"loss_sum": value.double() * masked, "masked_patches": masked,
            "count": torch.tensor(batch["image"].shape[0], device=masked.device)}


def summarize(sums):
    return {"loss": sums["loss_sum"] / max(sums["masked_patches"], 1), "count": int(sums["count"])}


def param_rules(config) -> ParamRules:
    """The model's rules (:func:`mim.models.mae.no_weight_decay`: main_pretrain.py decays
    every matrix), and the fixed sin-cos tables never trained (Sec. A.1). Anchored, so
    that no other name containing "pos_embed" is frozen."""
    return model_rules(config.model, frozen=tuple(rf"^{name}$" for name in mae.FROZEN))


def batch_extras(gen: torch.Generator, config):
    """Per-image uniform noise ``(L,)``; its argsort is the random mask (Sec. 3)."""
    return {"noise": mae.noise(gen, 1, config.model)[0]}


# ----------------------------------------------------------------------------------------
# Reconstruction pictures during training.


def fixed_noise(config, num: int) -> torch.Tensor:
    return mae.noise(torch.Generator().manual_seed(config.seed), num, config.model)


def reconstruct(params, images: torch.Tensor, noise: torch.Tensor, cfg, mean, std):
    """Grid (uint8 HWC) of original | masked | reconstruction | reconstruction + visible.

    With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; they are
    mapped back with the true patches' statistics, as the demo notebook's figures."""
    with torch.no_grad():
        _, aux = mae.apply(params, images, noise, cfg)
    pred = aux["pred"].float()
    if cfg.norm_pix_loss:
        pred = visualize.denormalize_pix(pred, images.float(), cfg.patch_size)
    return visualize.reconstruction_grid(images, pred, aux["mask"], cfg.patch_size,
                                         mean=tuple(mean), std=tuple(std))


def hooks(setup, writer):
    c = setup.config
    return visualize.ReconstructionHook(
        setup, writer, lambda config, n: {"noise": fixed_noise(config, n)},
        lambda params, images, noise: reconstruct(params, images, noise, c.model, c.data.mean, c.data.std))
