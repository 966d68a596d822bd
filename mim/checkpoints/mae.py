"""Import and export of the official MAE checkpoints (facebookresearch/mae).

Three layouts exist, and mim's trees use each one's key names unchanged:

* ``"mae"``: ``models_mae.MaskedAutoencoderViT`` (the ``*_full.pth`` and
  ``mae_visualize_*.pth`` files): encoder, decoder, mask token, fixed position tables.
* ``"mae_encoder"``: the released ``mae_pretrain_vit_*.pth`` files, which hold only the
  encoder (cls_token, pos_embed, patch_embed, blocks, norm).
* ``"vit"``: ``models_vit.VisionTransformer`` after fine-tuning, which is timm's layout
  (``fc_norm`` instead of ``norm`` with global average pooling), i.e. ``mim.models.vit``.

The key sets are the same as mim's, so the rename table is empty; files are read with
``weights_only=True`` and never unpickle arbitrary objects.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Optional

import torch

from mim import tree as T
from mim.checkpoints.weights import read_source, read_state_dict  # noqa: F401 (public here too)
from mim.models import mae, vit
from mim.nn import init as I

KINDS = ("mae", "mae_encoder", "vit")

# Official names that differ from mim's; none so far: both follow timm's module names.
RENAMES: dict = {}

# Head counts are not recorded in the weights; these are the paper's ViT sizes
# (Dosovitskiy et al. 2021, Table 1; MAE Sec. A.1). Other widths fall back to 64-d heads.
_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
_DECODER_HEADS = 16  # the reference uses 16 for every released decoder

_ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")


# ----------------------------------------------------------------------------------------
# Reading.


def detect_kind(flat: Mapping) -> str:
    """Which official layout a flat state_dict has (see module docstring)."""
    if any(k.startswith("head.0.") or k.startswith("head.1.") for k in flat):
        raise ValueError(
            "linear-probe checkpoint (head = BatchNorm1d + Linear, keys head.0.*/head.1.*) "
            "is not supported; drop the head.* keys to load its encoder")
    if "mask_token" in flat or any(k.startswith("decoder_") for k in flat):
        return "mae"
    if "head.weight" in flat or "fc_norm.weight" in flat:
        return "vit"
    if "norm.weight" in flat and "patch_embed.proj.weight" in flat:
        return "mae_encoder"
    raise ValueError(f"cannot tell the checkpoint layout from its keys: {sorted(flat)[:10]} ...")


def _require(flat: Mapping, *names: str) -> None:
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks keys needed to infer the model: {missing}")


def _count_blocks(flat: Mapping, prefix: str) -> int:
    ids = {int(m.group(1)) for k in flat if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _encoder_fields(flat: Mapping, num_prefix: int) -> dict:
    _require(flat, "patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    D, C, p, _ = flat["patch_embed.proj.weight"].shape
    n = flat["pos_embed"].shape[1] - num_prefix
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
    return dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D,
                depth=_count_blocks(flat, "blocks"), num_heads=_HEADS.get(D, max(1, D // 64)),
                mlp_ratio=flat["blocks.0.mlp.fc1.weight"].shape[0] / D)


def infer_config(flat: Mapping, kind: Optional[str] = None, **overrides):
    """A model config matching the checkpoint's shapes (an ``mae`` config for the
    pretraining layouts, a ``vit`` config for a fine-tuned model). Head counts are not
    stored in weights: they come from the standard sizes unless overridden."""
    kind = kind or detect_kind(flat)
    if kind in ("mae", "mae_encoder"):
        fields = _encoder_fields(flat, num_prefix=1)
        if kind == "mae":
            _require(flat, "decoder_embed.weight")
            fields.update(decoder_embed_dim=flat["decoder_embed.weight"].shape[0],
                          decoder_depth=_count_blocks(flat, "decoder_blocks"),
                          decoder_num_heads=_DECODER_HEADS)
        fields.update(overrides)
        return mae.config(**fields)
    if kind == "vit":
        class_token = "cls_token" in flat
        fields = _encoder_fields(flat, num_prefix=int(class_token))
        fields.update(class_token=class_token,
                      global_pool="avg" if "fc_norm.weight" in flat else "token",
                      num_classes=flat["head.weight"].shape[0] if "head.weight" in flat else 0)
        fields.update(overrides)
        return vit.config(**fields)
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")


# ----------------------------------------------------------------------------------------
# Validation against the layout a config implies.


def expected_shapes(kind: str, cfg) -> dict:
    """``{name: shape}`` in state_dict order, computed on the meta device (no memory)."""
    gen = torch.Generator()
    with torch.device("meta"):
        if kind == "vit":
            params = vit.init(gen, cfg)
        elif kind in ("mae", "mae_encoder"):
            params = mae.init(gen, cfg)
            if kind == "mae_encoder":
                params = {k: params[k] for k in _ENCODER_TOP}
        else:
            raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    return {k: tuple(v.shape) for k, v in T.flatten(params).items()}


def check_layout(flat: Mapping, kind: str, cfg) -> None:
    """ValueError naming missing keys, unexpected keys and shape mismatches."""
    want = expected_shapes(kind, cfg)
    missing = [k for k in want if k not in flat]
    unexpected = [k for k in flat if k not in want]
    wrong = [f"{k}: {tuple(flat[k].shape)} != {want[k]}"
             for k in want if k in flat and tuple(flat[k].shape) != want[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"shape mismatches {wrong}")
    if problems:
        raise ValueError(f"state_dict does not match the {kind!r} layout: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------
# Public API.


def load_official(src, cfg=None, kind: Optional[str] = None, return_config: bool = False):
    """mim tree from an official checkpoint (path or state_dict).

    The layout is detected from the keys unless ``kind`` is given; ``cfg`` (an ``mae`` or
    ``vit`` config) is inferred from the shapes unless given, and the key set and every
    shape are checked against it. With ``return_config`` returns ``(tree, cfg)``."""
    flat = {RENAMES.get(k, k): v for k, v in read_state_dict(src).items()}
    kind = kind or detect_kind(flat)
    cfg = cfg if cfg is not None else infer_config(flat, kind)
    check_layout(flat, kind, cfg)
    order = expected_shapes(kind, cfg)
    params = T.unflatten({k: flat[k] for k in order})
    return (params, cfg) if return_config else params


def export_official(params: Mapping, kind: Optional[str] = None) -> dict:
    """Flat state_dict in the reference's layout (``kind`` detected when omitted)."""
    flat = T.flatten(params)
    kind = kind or detect_kind(flat)
    check_layout(flat, kind, infer_config(flat, kind))
    inverse = {v: k for k, v in RENAMES.items()}
    return {inverse.get(k, k): v.detach() for k, v in flat.items()}


def save_official(params: Mapping, path, kind: Optional[str] = None) -> None:
    """Write ``{"model": state_dict}`` as the reference's scripts do (or a bare
    state_dict for ``.safetensors``), atomically: a crash leaves the old file intact."""
    sd = {k: v.contiguous() for k, v in export_official(params, kind).items()}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, tmp)
    else:
        torch.save({"model": sd}, tmp)
    os.replace(tmp, path)


def encoder_to_vit(mae_params: Mapping, vit_cfg, gen: Optional[torch.Generator] = None) -> dict:
    """Initial fine-tuning / linear-probe tree from an MAE encoder, as main_finetune.py
    does: load the encoder (decoder and mask token dropped), interpolate the position
    table if the resolution changes, replace ``norm`` by a fresh ``fc_norm`` under global
    average pooling (Sec. A.1), and draw a new head with trunc-normal(head_init_std)
    (2e-5 for fine-tuning, 0.01 for linear probing; zero bias)."""
    if not vit_cfg.class_token:
        raise ValueError("MAE encoders carry a class token; vit_cfg.class_token must be True")
    missing = [k for k in _ENCODER_TOP if k not in mae_params]
    if missing:
        raise ValueError(f"MAE tree lacks encoder entries {missing}")
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    ref = mae_params["cls_token"]
    src = T.flatten({k: mae_params[k] for k in _ENCODER_TOP})
    src["pos_embed"] = vit.resize_pos_embed(src["pos_embed"], vit.grid_size(vit_cfg), num_prefix=1)
    D = vit_cfg.embed_dim
    if vit_cfg.global_pool == "avg":
        del src["norm.weight"], src["norm.bias"]
        src["fc_norm.weight"], src["fc_norm.bias"] = I.ones((D,)), I.zeros((D,))
    if vit_cfg.num_classes > 0:
        if vit_cfg.head_init_std > 0:
            w = I.trunc_normal((vit_cfg.num_classes, D), vit_cfg.head_init_std, gen)
        else:
            w = I.zeros((vit_cfg.num_classes, D))
        src["head.weight"], src["head.bias"] = w, I.zeros((vit_cfg.num_classes,))
    src = {k: v.to(device=ref.device, dtype=ref.dtype) for k, v in src.items()}
    check_layout(src, "vit", vit_cfg)
    return T.unflatten({k: src[k] for k in expected_shapes("vit", vit_cfg)})


# ----------------------------------------------------------------------------------------
# Starting a fine-tuning / linear-probe run (config.init.format = "mae").

# Official or mim keys that a downstream ViT never uses: the decoder and mask token
# (dropped after pretraining, Sec. 3) and a linear probe's batch-norm statistics, which
# are model state, not parameters (the linprobe task reads them itself).
_PRETRAIN_ONLY = re.compile(r"^(mask_token|decoder_.*|head\.0\..*)$")
# Keys a downstream model may lack in the source and keep at their fresh initialisation,
# as the reference's load_state_dict(strict=False) allows (main_finetune.py,
# main_linprobe.py): the new head, and fc_norm under global pooling (Sec. A.1).
_FRESH = re.compile(r"^(head\..*|fc_norm\..*|norm\..*)$")


def load_for_finetune(params: dict, path, model_cfg) -> dict:
    """``params`` (freshly initialised by the task) with the encoder of an MAE checkpoint,
    the hook behind ``init.format="mae"`` (see mim.train.loop.Setup.load_init).

    ``path``: an official pretraining file (full ``mae`` or ``mae_encoder``), a fine-tuned
    or linear-probe ``models_vit`` file, or a mim checkpoint / workdir of an mae_pretrain,
    classify or linprobe run. As main_finetune.py / main_linprobe.py: the decoder and mask
    token are dropped, the position table is interpolated if the grid differs, ``norm`` is
    dropped under global pooling (a fresh ``fc_norm`` is used instead), and head entries
    that are absent or of another shape keep the task's fresh initialisation (trunc-normal
    2e-5 for fine-tuning, 0.01 for linear probing). Any other missing, unexpected or
    mis-shaped key is an error."""
    src = read_source(path)
    target = T.flatten(params)
    loaded, fresh = {}, []
    for k, v in src.items():
        if k in target:
            loaded[k] = v
        elif not (_PRETRAIN_ONLY.match(k) or _FRESH.match(k)):
            raise ValueError(f"{path}: key {k!r} has no place in the model "
                             f"({model_cfg.get('name', 'vit')} with global_pool="
                             f"{model_cfg.get('global_pool')!r})")
    for k in ("head.weight", "head.bias", "head.1.weight", "head.1.bias"):
        if k in loaded and loaded[k].shape != target[k].shape:
            # Another class count: a new head, as the reference deletes these keys.
            del loaded[k]
    for k in target:
        if k not in loaded:
            if not _FRESH.match(k):
                raise ValueError(f"{path}: the checkpoint lacks {k!r}")
            fresh.append(k)
    if "pos_embed" in loaded:
        loaded["pos_embed"] = vit.resize_pos_embed(
            loaded["pos_embed"], vit.grid_size(model_cfg), vit.num_prefix_tokens(model_cfg))
    from mim.checkpoints import weights
    return weights.merge_into(params, loaded, skip=fresh, source=os.fspath(path))
