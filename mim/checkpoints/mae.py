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

Weights fix every shape but not the head counts, the layer-norm eps or the training
settings (``norm_pix_loss``, ``mask_ratio``). Those come from the caller's config or
keyword fields, or from the ``args`` the reference's scripts save next to ``model``
(its ``model`` name is one of :data:`ARCHS`); otherwise the import stops and says which
are missing. Nothing is inferred from a width.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Optional

import torch

from mim import tree as T
from mim.checkpoints.weights import (  # noqa: F401 (public here too)
    read_source, read_state_dict, read_with_args)
from mim.models import mae, vit
from mim.nn import init as I

KINDS = ("mae", "mae_encoder", "vit")

# Official names that differ from mim's; none so far: both follow timm's module names.
RENAMES: dict = {}

# What the weights cannot tell, per layout: head counts and layer-norm eps change no
# shape; norm_pix_loss (the decoder's target) and mask_ratio are training settings. They
# come from the caller (a config or keyword arguments) or from the file's saved "args".
UNRECORDED = {
    "mae": ("num_heads", "decoder_num_heads", "norm_eps", "norm_pix_loss", "mask_ratio"),
    "mae_encoder": ("num_heads", "norm_eps"),
    "vit": ("num_heads", "norm_eps"),
}

# The reference's named architectures (models_mae.py, models_vit.py: every one uses
# LayerNorm eps 1e-6, MLP ratio 4 and, for MAE, the 512-d 8-block 16-head decoder): what
# a checkpoint's ``args.model``, or the ``arch`` argument, states beyond the weights.
_MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
_VITS = {
    "base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
ARCHS = {}
for _size, _fields in _VITS.items():
    for _name in (f"mae_vit_{_size}", f"mae_vit_{_size}_dec512d8b"):
        ARCHS[_name] = dict(_fields, **_MAE_DECODER, mlp_ratio=4.0, norm_eps=1e-6)
    ARCHS[f"vit_{_size}"] = dict(_fields, mlp_ratio=4.0, norm_eps=1e-6)

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


def _shape_fields(flat: Mapping, kind: str) -> dict:
    """The config fields the tensors' shapes and names determine."""
    num_prefix = 1 if kind != "vit" else int("cls_token" in flat)
    _require(flat, "patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    D, C, p, _ = flat["patch_embed.proj.weight"].shape
    n = flat["pos_embed"].shape[1] - num_prefix
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pos_embed has {n} patch rows, not a square grid")
    fields = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=D,
                  depth=_count_blocks(flat, "blocks"),
                  mlp_ratio=flat["blocks.0.mlp.fc1.weight"].shape[0] / D)
    if kind == "mae":
        _require(flat, "decoder_embed.weight")
        fields.update(decoder_embed_dim=flat["decoder_embed.weight"].shape[0],
                      decoder_depth=_count_blocks(flat, "decoder_blocks"))
    elif kind == "vit":
        fields.update(class_token=bool(num_prefix),
                      global_pool="avg" if "fc_norm.weight" in flat else "token",
                      num_classes=flat["head.weight"].shape[0] if "head.weight" in flat else 0)
    return fields


def _make_config(kind: str, fields: dict):
    if kind in ("mae", "mae_encoder"):
        return mae.config(**fields)
    if kind == "vit":
        return vit.config(**fields)
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")


def _from_args(args: Optional[Mapping], arch: Optional[str]) -> dict:
    """Fields stated by an architecture name (``arch``, or the saved ``args.model`` when it
    is one of the reference's) and by the saved ``norm_pix_loss`` / ``mask_ratio``."""
    if arch is not None and arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not one of the reference's architectures {sorted(ARCHS)}")
    saved = dict(args or {})
    name = saved.get("model")
    if arch is not None and name is not None and name != arch:
        raise ValueError(f"arch={arch!r} contradicts the checkpoint's saved args.model={name!r}")
    out = dict(ARCHS.get(arch or name, {}))
    out.update({k: saved[k] for k in ("norm_pix_loss", "mask_ratio") if k in saved})
    return out


def infer_config(flat: Mapping, kind: Optional[str] = None, args: Optional[Mapping] = None,
                 arch: Optional[str] = None, **given):
    """The model config of a checkpoint (an ``mae`` config for the pretraining layouts, a
    ``vit`` config for a fine-tuned model), never guessed: shapes come from the weights;
    what they cannot tell (:data:`UNRECORDED`: head counts, eps, the MAE training settings)
    from ``given`` keyword fields, else from ``arch`` (a name in :data:`ARCHS`) or the
    checkpoint's saved training ``args`` (its ``model`` name, ``norm_pix_loss``,
    ``mask_ratio``). A missing field, or a stated architecture that contradicts the
    weights, is an error naming it."""
    kind = kind or detect_kind(flat)
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {KINDS}")
    shapes = _shape_fields(flat, kind)
    stated = _from_args(args, arch)
    # mask_ratio is a setting a user may change (visualising at another ratio); the rest
    # would run another model on these weights.
    contradicted = [f"{k}={v!r} (stated: {stated[k]!r})" for k, v in given.items()
                    if k in stated and k != "mask_ratio" and stated[k] != v]
    if contradicted:
        raise ValueError(f"{', '.join(contradicted)} contradicts the architecture the checkpoint's "
                         f"saved args or arch= state")
    stated.update(given)
    clash = [f"{k}={stated[k]!r} (weights: {v!r})" for k, v in shapes.items()
             if k in stated and stated[k] != v]
    if clash:
        raise ValueError(f"the stated architecture (arch={arch!r}, saved args.model="
                         f"{(args or {}).get('model')!r}, fields) has {', '.join(clash)}, "
                         "which the checkpoint's weights contradict")
    missing = [k for k in UNRECORDED[kind] if k not in stated]
    if missing:
        raise ValueError(
            f"the {kind!r} checkpoint does not record {', '.join(missing)} (weights hold no head "
            "counts, eps or training settings, and it saved no training args stating them); pass "
            f"cfg=mim.models.{'vit' if kind == 'vit' else 'mae'}.config(...), or "
            f"{', '.join(f'{k}=...' for k in missing)} as keyword arguments, or arch=<one of "
            f"{sorted(ARCHS)}> for an official architecture")
    fields = dict(shapes)
    fields.update({k: stated[k] for k in UNRECORDED[kind]})
    fields.update({k: v for k, v in given.items() if k not in fields})
    return _make_config(kind, fields)


def _layout_config(flat: Mapping, kind: str):
    """A config with the checkpoint's shapes, for checking its layout only: head counts
    and eps change no shape, so the defaults standing in for them are never run."""
    return _make_config(kind, _shape_fields(flat, kind))


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


def load_official(src, cfg=None, kind: Optional[str] = None, return_config: bool = False,
                  **fields):
    """mim tree from an official checkpoint (path or state_dict).

    The layout is detected from the keys unless ``kind`` is given. ``cfg`` (an ``mae`` or
    ``vit`` config) is the model the weights are for; without it the config is
    :func:`infer_config` from the shapes, the file's saved training ``args`` and
    ``fields`` (``num_heads=...``, ``arch=...``), and the import stops naming what none of
    them states. The key set and every shape are checked. With ``return_config`` returns
    ``(tree, cfg)``."""
    flat, args = read_with_args(src)
    flat = {RENAMES.get(k, k): v for k, v in flat.items()}
    kind = kind or detect_kind(flat)
    if cfg is None:
        cfg = infer_config(flat, kind, args=args, **fields)
    elif fields:
        raise ValueError(f"load_official: give either cfg or fields, not both (got {sorted(fields)})")
    else:
        _check_against_args(cfg, args)
    check_layout(flat, kind, cfg)
    order = expected_shapes(kind, cfg)
    params = T.unflatten({k: flat[k] for k in order})
    return (params, cfg) if return_config else params


def _check_against_args(cfg, args: Optional[Mapping]) -> None:
    """A config that contradicts the architecture or target the checkpoint was trained
    with would run another model on its weights."""
    if args is None:
        return
    # mask_ratio is a setting a user may change (visualising at another ratio).
    stated = {k: v for k, v in _from_args(args, None).items() if k != "mask_ratio"}
    clash = [f"{k}: config {cfg[k]!r}, checkpoint args {v!r}" for k, v in stated.items()
             if k in cfg and cfg[k] != v]
    if clash:
        raise ValueError(f"the config contradicts the checkpoint's saved training args: {clash}")


def export_official(params: Mapping, kind: Optional[str] = None) -> dict:
    """Flat state_dict in the reference's layout (``kind`` detected when omitted)."""
    flat = T.flatten(params)
    kind = kind or detect_kind(flat)
    check_layout(flat, kind, _layout_config(flat, kind))
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
