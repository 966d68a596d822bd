"""timm ``VisionTransformer`` state_dicts <-> mim ViT trees. The layouts are the same
by construction (see :mod:`mim.models.vit`), so import is unflatten plus, for
fine-tuning, a new head and a resized position embedding."""
from __future__ import annotations

import logging

from mim import tree
from mim.checkpoints import weights
from mim.models import vit

log = logging.getLogger(__name__)


def to_state_dict(params: dict) -> dict:
    return {k: v.detach().clone() for k, v in tree.flatten(params).items()}


def load_for_finetune(params: dict, path: str, cfg) -> dict:
    """Start ``params`` (freshly initialised for ``cfg``) from a timm checkpoint file.

    A head whose class count differs is left at its fresh initialisation (zeros when
    ``cfg.head_init_std == 0``, as the ViT paper's fine-tuning does), and the position
    embedding is resized bicubically when the resolution differs."""
    sd = weights.read_state_dict(path)
    flat = tree.flatten(params)
    skip = set()
    for k in ("head.weight", "head.bias"):
        if k in sd and k in flat and sd[k].shape != flat[k].shape:
            log.info("%s: %s %s -> new head %s", path, k, tuple(sd[k].shape), tuple(flat[k].shape))
            skip.add(k)
            sd.pop(k)
        elif k not in sd:
            skip.add(k)
    # A checkpoint trained with the other pooling carries norm vs fc_norm; keep ours fresh.
    for k in ("fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias"):
        if k in sd and k not in flat:
            sd.pop(k)
        elif k in flat and k not in sd:
            skip.add(k)

    def adapt(name, v, target):
        if name == "pos_embed" and v.shape != target.shape:
            return vit.resize_pos_embed(v, vit.grid_size(cfg), vit.num_prefix_tokens(cfg))
        return v

    return weights.merge_into(params, sd, skip=skip, adapt=adapt, source=path)
