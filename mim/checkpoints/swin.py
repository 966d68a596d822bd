"""Import and export of official Swin Transformer and SimMIM checkpoints (Swin and the
reference's BEiT-style ViT, ``mim.models.beit``).

mim's Swin tree already uses microsoft/Swin-Transformer's key names, so importing is an
unflatten after dropping the non-learned buffers (``relative_position_index``,
``attn_mask``, ``relative_coords_table``) that mim recomputes. Three inputs are accepted:

* Swin classification checkpoints (``{"model": state_dict}``, official layout),
* SimMIM pre-training checkpoints (``encoder.*``, ``decoder.0.*``; microsoft/SimMIM),
  with a Swin or a ViT encoder,
* SimMIM fine-tuning checkpoints (a plain ``SwinTransformer`` or ``VisionTransformer``
  state dict; the ViT's keys are BEiT's, which timm's ``Beit`` shares),

and, for convenience, timm-layout Swin weights (``layers.{i+1}.downsample``, ``head.fc``),
mapped back to the official layout. Files are read with ``torch.load(weights_only=True)``
or safetensors; nothing else is unpickled.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

import torch

from mim import tree as T
from mim.checkpoints.weights import read_source, read_state_dict  # noqa: F401 (public here too)
from mim.models import beit, swin
from mim.nn import relpos

_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
_TABLE = "relative_position_bias_table"
_SHARED_TABLE = "rel_pos_bias." + _TABLE


def _from_timm_layout(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm puts each patch merging at the START of the next stage and the classifier at
    ``head.fc``; the official layout has them at the end of the stage and at ``head``."""
    timm_merge = ("layers.0.downsample.reduction.weight" not in sd
                  and any(re.match(r"layers\.\d+\.downsample\.", k) for k in sd))
    if not timm_merge and not any(k.startswith("head.fc.") for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample",
                   lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


def _check_keys(sd: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], what: str):
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{what}: missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    wrong = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{what}: shape mismatches {wrong[:10]}")


def expected_shapes(cfg) -> Dict[str, torch.Tensor]:
    """Flat meta tensors of the tree ``cfg`` describes (a Swin, BEiT-style ViT or SimMIM
    config)."""
    with torch.device("meta"):
        if cfg.name == "simmim":
            from mim.models import simmim
            return T.flatten(simmim.init(torch.Generator(), cfg))
        if cfg.name == "beit":
            return T.flatten(beit.init(torch.Generator(), cfg))
        return T.flatten(swin.init(torch.Generator(), cfg))


def _official_swin_keys(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Buffers dropped, timm's Swin layout mapped to the official one; an error if this is
    not a Swin, BEiT-style ViT or SimMIM state dict."""
    sd = {k: v for k, v in sd.items() if not any(b in k for b in _BUFFERS)}
    if not any(k.startswith("encoder.") for k in sd):
        sd = _from_timm_layout(sd)
    if "patch_embed.proj.weight" not in sd and "encoder.patch_embed.proj.weight" not in sd:
        raise ValueError("not a Swin/ViT/SimMIM checkpoint: no patch_embed.proj.weight "
                         f"(first keys: {list(sd)[:5]})")
    return sd


def load_official(path_or_sd, cfg=None) -> dict:
    """Tree from an official Swin, SimMIM pre-training or SimMIM fine-tuning checkpoint.

    Buffers are dropped. With ``cfg`` (``mim.models.swin.config``, ``mim.models.beit.config``
    or ``mim.models.simmim.config``) the keys and shapes must match ``init(cfg)`` exactly, and
    the error names every missing and unexpected key; without it the checkpoint's own keys
    are kept (a SimMIM pre-training checkpoint stays ``encoder.*`` / ``decoder.*``)."""
    sd = _official_swin_keys(read_state_dict(path_or_sd))
    if cfg is None:
        return T.unflatten(sd)
    expected = expected_shapes(cfg)
    _check_keys(sd, expected, f"checkpoint vs {cfg.name} config")
    return T.unflatten({k: sd[k] for k in expected})


def interpolate_rel_pos_bias(table: torch.Tensor, src_window: int, dst_window: int) -> torch.Tensor:
    """A ``((2*src-1)^2, heads)`` Swin table resized to ``dst_window`` as SimMIM's
    ``load_pretrained`` does when fine-tuning at another window (6 -> 7; Xie et al. 2022
    Sec. 4.1): :func:`mim.nn.relpos.resize`."""
    if table.shape[0] != relpos.table_rows(src_window):
        raise ValueError(f"{_TABLE} has {table.shape[0]} rows; window {src_window} needs "
                         f"{relpos.table_rows(src_window)}")
    return relpos.resize(table, dst_window)


# ----------------------------------------------------------------------------------------
# SimMIM pre-training -> Swin fine-tuning, and export.


def simmim_to_swin(tree: dict, swin_cfg, gen: Optional[torch.Generator] = None,
                   fresh: Optional[dict] = None) -> dict:
    """Fine-tuning Swin tree from a SimMIM pre-training tree (SimMIM ``load_pretrained``):
    strip ``encoder.``, drop ``mask_token`` and the decoder, interpolate each relative
    position bias table whose window differs, and take parameters absent from the
    checkpoint (the classifier ``head``) from ``fresh`` (a tree for ``swin_cfg``), or else
    from ``swin.init(gen, swin_cfg)``. Loaded tensors take ``fresh``'s dtype and device.

    Unlike the reference's ``strict=False`` load, any other missing or unexpected key, and
    any shape mismatch, is an error naming the keys."""
    flat = T.flatten(tree)
    if any(k.startswith("encoder.") for k in flat):
        flat = {k[len("encoder."):]: v for k, v in flat.items() if k.startswith("encoder.")}
    flat = {k: v for k, v in flat.items() if k != "mask_token" and not any(b in k for b in _BUFFERS)}
    if fresh is None:
        fresh = swin.init(gen if gen is not None else torch.Generator().manual_seed(0), swin_cfg)
    fresh = T.flatten(fresh)
    missing = [k for k in fresh if k not in flat and not k.startswith("head.")]
    unexpected = [k for k in flat if k not in fresh]
    if missing or unexpected:
        raise ValueError(f"SimMIM tree vs Swin config: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}")
    out = {}
    for k, init_value in fresh.items():
        v = flat.get(k)
        if v is None:
            out[k] = init_value
            continue
        if k.endswith(_TABLE) and v.shape != init_value.shape:
            if v.shape[1] != init_value.shape[1]:
                raise ValueError(f"{k}: {v.shape[1]} heads in the checkpoint, "
                                 f"{init_value.shape[1]} in the config")
            v = relpos.resize(v, relpos.table_size(init_value.shape[0]))
        if v.shape != init_value.shape:
            if k.startswith("head."):
                v = init_value  # another label set: a fresh classifier, as the reference's head
            else:
                raise ValueError(f"{k}: shape {tuple(v.shape)} in the checkpoint, "
                                 f"{tuple(init_value.shape)} in the config")
        out[k] = v.to(device=init_value.device, dtype=init_value.dtype)
    return T.unflatten(out)


def _buffers_for(cfg) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per block prefix, the official buffers for ``cfg`` at ``cfg.img_size``."""
    out = {}
    for i, (H, W, window, shift) in enumerate(swin.stage_geometry(cfg, cfg.img_size, cfg.img_size)):
        for j in range(cfg.depths[i]):
            b = {"attn.relative_position_index": relpos.window_index(window).clone()}
            if j % 2 and shift:
                b["attn_mask"] = swin.shift_attn_mask(H, W, window, shift).clone()
            out[f"layers.{i}.blocks.{j}."] = b
    return out


def _with_beit_buffers(flat: Dict[str, torch.Tensor], cfg, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The official BEiT-style ViT registers a persistent ``relative_position_index`` right
    after each ``relative_position_bias_table``."""
    buffers = {prefix + k: (prefix + name, idx.clone())
               for k, (name, idx) in beit.official_buffers(cfg).items()}
    out = {}
    for k, v in flat.items():
        out[k] = v
        if k in buffers:
            name, idx = buffers[k]
            out[name] = idx
    return out


def export_official(tree: dict, cfg=None) -> Dict[str, torch.Tensor]:
    """Flat official state dict. With ``cfg`` (Swin, BEiT-style ViT, or SimMIM with either
    encoder) the buffers the official modules register (``relative_position_index``, the
    shifted Swin blocks' ``attn_mask``) are added in their places, so
    ``load_state_dict(strict=True)`` on microsoft's ``SwinTransformer`` /
    ``VisionTransformer`` / ``SimMIM`` succeeds."""
    flat = T.flatten(tree)
    if cfg is None:
        return dict(flat)
    prefix = ""
    if cfg.name == "simmim":
        prefix, cfg = "encoder.", cfg.encoder
    if cfg.name == "beit":
        return _with_beit_buffers(flat, cfg, prefix)
    buffers = {prefix + k: v for k, v in _buffers_for(cfg).items()}
    out = {}
    for k, v in flat.items():
        m = re.match(r"(.*layers\.\d+\.blocks\.\d+\.)(.*)", k)
        block = buffers[m.group(1)] if m else {}
        if m and m.group(2) == "norm1.weight" and "attn_mask" in block:
            out[m.group(1) + "attn_mask"] = block["attn_mask"]  # a module's own buffers precede its children
        out[k] = v
        if m and m.group(2) == "attn." + _TABLE:
            out[m.group(1) + "attn.relative_position_index"] = block["attn.relative_position_index"]
    return out


# ----------------------------------------------------------------------------------------
# Starting a fine-tuning run (config.init.format = "swin"; mim.train.loop.Setup.load_init).


def simmim_to_beit(flat: Dict[str, torch.Tensor], fresh: dict, cfg, source: str = "") -> dict:
    """Fine-tuning BEiT-style ViT tree (``fresh``, for ``cfg``) from a SimMIM ViT
    pretraining state dict or a ViT classification one, as SimMIM's ``load_pretrained`` /
    ``remap_pretrained_keys_vit`` (after BEiT's ``run_class_finetuning.py``):

    * ``encoder.`` stripped, ``mask_token``, the decoder and ``relative_position_index``
      buffers dropped;
    * a shared table (``rel_pos_bias.*``) copied into every block when the model has
      per-block relative position bias (``use_rel_pos_bias``) and no shared one;
    * every table resized when the patch grid differs (:func:`mim.models.beit.resize_rel_pos_bias`:
      the (2G-1)^2 part by the geometric bicubic spline, the 3 class-token rows kept), and
      ``pos_embed`` bicubically (:func:`mim.models.vit.resize_pos_embed`);
    * ``norm`` dropped under mean pooling and ``fc_norm`` under class-token pooling (the
      reference's ``strict=False`` load ignores them); ``fc_norm`` and ``head`` come from
      ``fresh`` unless the checkpoint has them with the same shapes (evaluating a
      fine-tuned checkpoint keeps its classifier).

    Any other missing, unexpected or mis-shaped key is an error naming it."""
    from mim.checkpoints import weights
    from mim.models import vit

    if any(k.startswith("encoder.") for k in flat):
        flat = {k[len("encoder."):]: v for k, v in flat.items() if k.startswith("encoder.")}
    flat = {k: v for k, v in flat.items()
            if k != "mask_token" and not k.endswith("relative_position_index")}
    target = T.flatten(fresh)
    per_block = [k for k in target if k.startswith("blocks.") and k.endswith(_TABLE)]
    if _SHARED_TABLE in flat and _SHARED_TABLE not in target and per_block:
        shared = flat.pop(_SHARED_TABLE)
        for k in per_block:
            if k in flat:
                raise ValueError(f"{source}: both a shared relative position bias and {k}")
            flat[k] = shared.clone()
    for k in ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias"):
        if k in flat and k not in target:
            flat.pop(k)
    skip = [k for k in target if k.startswith(("head.", "fc_norm."))
            and not (k in flat and flat[k].shape == target[k].shape)]
    for k in skip:
        flat.pop(k, None)
    grid = beit.grid_size(cfg)

    def adapt(name, v, t):
        if name.endswith(_TABLE) and v.shape != t.shape:
            if v.shape[1] != t.shape[1]:
                raise ValueError(f"{source}: {name} has {v.shape[1]} heads, the model {t.shape[1]}")
            v = beit.resize_rel_pos_bias(v, grid)
        elif name == "pos_embed" and v.shape != t.shape:
            v = vit.resize_pos_embed(v, grid, 1)
        return v.to(t.device)

    return weights.merge_into(fresh, flat, skip=skip, adapt=adapt, source=source)


def load_for_finetune(params: dict, path, model_cfg) -> dict:
    """``params`` (freshly initialised by the classify task for ``model_cfg``) started from
    ``path``; the hook behind ``init.format="swin"``.

    ``path``: a SimMIM pretraining checkpoint (microsoft/SimMIM's ``encoder.*`` /
    ``decoder.*`` file, or a mim ``simmim_pretrain`` checkpoint directory or workdir), or a
    classification checkpoint (official, timm layout, or a mim classify run) of the same
    architecture. Swin (``model.name="swin"``): relative position bias tables are
    interpolated to the fine-tuning window (6 -> 7 in the paper, Sec. 4.1) and the head is
    ``params``'s own unless the checkpoint has one of the same shape (:func:`simmim_to_swin`).
    ViT (``model.name="beit"``, the reference's BEiT-style ViT): :func:`simmim_to_beit`."""
    name = model_cfg.get("name")
    if name is None:
        raise ValueError("init.format='swin': model config has no 'name' ('swin' or 'beit'); "
                         "build it with mim.models.swin.config or mim.models.beit.config")
    flat = read_source(path)
    if name == "swin":
        return simmim_to_swin(T.unflatten(_official_swin_keys(flat)), model_cfg, fresh=params)
    if name == "beit":
        return simmim_to_beit(flat, params, model_cfg, source=os.fspath(path))
    if name == "vit":
        raise ValueError("init.format='swin': SimMIM's ViT is BEiT-style (relative position bias, "
                         "q/v biases, gamma layer scale); fine-tune it as model.name='beit' "
                         "(mim.models.beit.config), not the timm-layout 'vit'")
    raise ValueError(f"init.format='swin' loads Swin or BEiT-style ViT models, not model.name={name!r}")
