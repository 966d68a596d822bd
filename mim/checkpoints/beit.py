"""Import and export of official BEiT checkpoints (microsoft/unilm ``beit/``), and the start
of a fine-tuning run from one.

Two layouts, both the official modules' ``state_dict()`` keys (mim's trees use them as they
are, without the ``relative_position_index`` buffers, which are a function of the patch grid):

* pretraining (``VisionTransformerForMaskedImageModeling``, ``beit_*_pt22k.pth`` and
  ``run_beit_pretraining.py`` checkpoints): ``cls_token``, ``mask_token``, one shared table
  ``rel_pos_bias.*``, blocks, ``norm``, ``lm_head``; model config
  :func:`mim.models.beit_pretrain.config`;
* fine-tuned (``VisionTransformer``, ``beit_*_pt22k_ft22k.pth``, ``*_ft22kto1k.pth``): a
  table per block, ``fc_norm`` and ``head`` under mean pooling; model config
  :func:`mim.models.beit.config`.

Weights may sit under ``model`` or ``module`` (the reference's ``--model_key model|module``).
Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict

import torch

from mim import tree as T
from mim.checkpoints import weights
from mim.models import beit, beit_pretrain, vit
from mim.nn import relpos

_INDEX = "relative_position_index"
_TABLE = "relative_position_bias_table"
_SHARED = "rel_pos_bias." + _TABLE


def _read(src) -> Dict[str, torch.Tensor]:
    """Flat state dict of a mapping, an official file, or a mim checkpoint / workdir."""
    if isinstance(src, Mapping):
        return weights.read_state_dict(src)
    return weights.read_source(src)


def _backbone(cfg):
    if cfg.name == "beit_pretrain":
        return beit_pretrain.backbone(cfg)
    if cfg.name == "beit":
        return cfg
    raise ValueError(f"mim.checkpoints.beit: model.name={cfg.name!r} is neither 'beit_pretrain' "
                     f"nor 'beit'")


def expected(cfg) -> Dict[str, torch.Tensor]:
    """Flat meta tensors of the tree ``cfg`` describes, in the official order."""
    module = beit_pretrain if cfg.name == "beit_pretrain" else beit
    _backbone(cfg)
    with torch.device("meta"):
        return T.flatten(module.init(torch.Generator(), cfg))


def _drop_indices(flat: Dict[str, torch.Tensor], grid: int, source: str) -> Dict[str, torch.Tensor]:
    """Remove the ``relative_position_index`` buffers, checking that each one is the index of
    ``grid`` (another one would mean a checkpoint of another geometry)."""
    want = relpos.class_token_index(grid)
    out = {}
    for k, v in flat.items():
        if k.endswith(_INDEX):
            if v.shape != want.shape or not torch.equal(v.to(want.dtype), want):
                raise ValueError(f"{source}: {k} is not the relative position index of a {grid}x{grid} "
                                 f"patch grid (shape {tuple(v.shape)})")
            continue
        out[k] = v
    return out


def _check(flat: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], source: str) -> None:
    missing = [k for k in want if k not in flat]
    unexpected = [k for k in flat if k not in want]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match the model config: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    wrong = [f"{k}: {tuple(flat[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
             if tuple(flat[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{source}: shapes differ from the model config: {wrong[:10]}")


def load_official(src, cfg) -> dict:
    """Tree for ``cfg`` (``beit_pretrain`` or ``beit``) from an official checkpoint of that
    layout; every key and shape must match, and index buffers must be the grid's own."""
    source = src if isinstance(src, (str, os.PathLike)) else "state dict"
    flat = _drop_indices(_read(src), beit.grid_size(_backbone(cfg)), str(source))
    want = expected(cfg)
    _check(flat, want, str(source))
    return T.unflatten({k: flat[k] for k in want})


def export_official(params: dict, cfg) -> Dict[str, torch.Tensor]:
    """Flat state dict with the official keys in the official order: the persistent
    ``relative_position_index`` buffers follow their tables, so ``load_state_dict(strict=True)``
    on the reference module succeeds."""
    buffers = beit.official_buffers(_backbone(cfg))
    out = {}
    for k, v in T.flatten(params).items():
        out[k] = v
        if k in buffers:
            name, idx = buffers[k]
            out[name] = idx.clone()
    return out


# ----------------------------------------------------------------------------------------
# Fine-tuning: run_class_finetuning.py's conversion of a checkpoint.


def to_finetune(flat: Dict[str, torch.Tensor], fresh: dict, cfg, source: str = "") -> dict:
    """Tree for the fine-tuning model ``cfg`` (:func:`mim.models.beit.config`) from a BEiT
    pretraining or fine-tuned state dict, ``fresh`` (that model's initialisation, whose head
    is already scaled by ``init_scale``) giving what the checkpoint does not. The steps of
    ``run_class_finetuning.py``, in its order:

    1. ``head.*`` of another shape (another label set) is removed, so the fresh head stays;
    2. a shared table (``rel_pos_bias.*``) is copied into every block when the model has
       per-block tables (``use_rel_pos_bias``), and removed;
    3. ``relative_position_index`` buffers are dropped (mim recomputes them);
    4. every table of another patch grid is resized (:func:`mim.nn.relpos.resize`: the
       reference's geometric-progression bicubic interpolation, class-token rows kept);
    5. ``pos_embed`` of another grid is interpolated bicubically;
    6. the reference's non-strict load: ``mask_token``, ``lm_head.*`` and the ``norm`` /
       ``fc_norm`` the model does not have are ignored, and ``head``, ``fc_norm`` and
       ``norm`` absent from the checkpoint keep ``fresh``'s values. Any other missing,
       unexpected or mis-shaped key is an error (the reference would leave it at its
       initialisation and print a warning)."""
    flat = dict(flat)
    target = T.flatten(fresh)
    grid = beit.grid_size(cfg)
    for k in ("head.weight", "head.bias"):
        if k in flat and k in target and flat[k].shape != target[k].shape:
            del flat[k]
    if cfg.use_rel_pos_bias and _SHARED in flat:
        shared = flat.pop(_SHARED)
        for i in range(cfg.depth):
            flat[f"blocks.{i}.attn.{_TABLE}"] = shared.clone()
    flat = {k: v for k, v in flat.items() if not k.endswith(_INDEX)}
    for k, v in list(flat.items()):
        if k.endswith(_TABLE) and k in target and v.shape != target[k].shape:
            if v.shape[1] != target[k].shape[1]:
                raise ValueError(f"{source}: {k} has {v.shape[1]} heads, the model {target[k].shape[1]}")
            flat[k] = relpos.resize(v, grid, relpos.NUM_EXTRA)
    if "pos_embed" in flat and "pos_embed" in target and flat["pos_embed"].shape != target["pos_embed"].shape:
        flat["pos_embed"] = vit.resize_pos_embed(flat["pos_embed"], grid, 1)
    ignorable = ("mask_token", "lm_head.weight", "lm_head.bias", "norm.weight", "norm.bias",
                 "fc_norm.weight", "fc_norm.bias")
    flat = {k: v for k, v in flat.items() if k in target or k not in ignorable}
    keep_fresh = [k for k in target if k not in flat and k.startswith(("head.", "fc_norm.", "norm.", "linear."))]
    return weights.merge_into(fresh, flat, skip=keep_fresh,
                              adapt=lambda name, v, t: v.to(t.device), source=source)


def load_for_finetune(params: dict, path, model_cfg) -> dict:
    """``params`` (the classify task's fresh tree for ``model_cfg``, a
    :func:`mim.models.beit.config`) started from ``path``: an official BEiT pretraining or
    fine-tuned checkpoint (weights under ``model`` or ``module``), or a mim
    ``beit_pretrain`` / BEiT ``classify`` checkpoint directory or workdir. The hook behind
    ``init.format="beit"``; see :func:`to_finetune`."""
    if model_cfg.get("name") != "beit":
        raise ValueError(f"init.format='beit' fine-tunes a BEiT ViT (model.name='beit', "
                         f"mim.models.beit.config), not model.name={model_cfg.get('name')!r}")
    return to_finetune(_read(path), params, model_cfg, source=os.fspath(path))
