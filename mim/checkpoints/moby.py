"""Import and export of MoBY checkpoints (SwinTransformer/Transformer-SSL).

* ``moby_main.py`` saves ``{"model": MoBY.state_dict(), ...}``: ``queue1``, ``queue2``,
  ``queue_ptr`` (the root module's buffers come first), then ``encoder.*``,
  ``encoder_k.*``, ``projector.*``, ``projector_k.*``, ``predictor.*``, the Swin parts with
  their ``relative_position_index`` / ``attn_mask`` buffers. :func:`load_official` maps it
  to mim's ``(params, model_state)`` (:mod:`mim.models.moby`) and :func:`export_official`
  back, with the same keys, order, shapes, dtypes and values.
* The online encoder alone is a plain Swin backbone (:func:`encoder_state_dict`), which
  ``init.format="swin"`` fine-tuning loads; that loader also reads a whole MoBY checkpoint,
  since it keeps the ``encoder.*`` entries (``moby_linear.py``'s ``load_pretrained`` does
  the same).
* ``moby_linear.py`` saves a plain ``SwinTransformer`` with its linear ``head``:
  :func:`load_linear` reads it for evaluation.

Files are read with ``torch.load(weights_only=True)`` or safetensors. The reference's
training checkpoints also pickle their yacs config; re-save their ``model`` entry where the
file is trusted (the reader's error says so).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Dict, Tuple

import torch

from mim import tree as T
from mim.checkpoints import swin as swin_ckpt
from mim.checkpoints.weights import read_source, read_state_dict
from mim.models import moby

_SWIN_BUFFERS = ("relative_position_index", "attn_mask", "relative_coords_table")
_QUEUES = ("queue1", "queue2", "queue_ptr")


def _meta_tree(t: dict) -> dict:
    return T.map(lambda x: torch.empty(x.shape, dtype=x.dtype, device="meta"), t)


def expected(cfg) -> Tuple[dict, dict]:
    """``(params, model_state)`` of ``cfg`` as meta tensors (shapes and dtypes only)."""
    with torch.device("meta"):
        return moby.init(torch.Generator(), cfg)


def _read(src) -> Dict[str, torch.Tensor]:
    if isinstance(src, Mapping):
        return read_state_dict(src)
    # a mim moby_pretrain checkpoint stores params.* and model_state.*: their union is
    # the reference's dict, less the Swin buffers
    return read_source(src, include_model_state=True)


def _is_swin_buffer(name: str) -> bool:
    return name.startswith(("encoder.", "encoder_k.")) and name.rsplit(".", 1)[-1] in _SWIN_BUFFERS


def load_official(src, cfg) -> Tuple[dict, dict]:
    """``(params, model_state)`` from a reference MoBY checkpoint (a path, or a mapping
    such as the loaded file or its ``model`` entry) or a mim ``moby_pretrain`` checkpoint.

    ``cfg`` (``mim.models.moby.config``) is required: head counts, the window and the
    drop-path rates are not in a state dict. The Swin buffers are dropped (mim recomputes
    them); every other key must match ``cfg`` exactly in name and shape, and the error
    names every missing, unexpected and mis-shaped key. Values keep the file's dtype
    (``queue_ptr`` and ``num_batches_tracked`` stay int64)."""
    sd = {k: v for k, v in _read(src).items() if not _is_swin_buffer(k)}
    if "encoder.patch_embed.proj.weight" not in sd or "queue1" not in sd:
        raise ValueError(f"not a MoBY checkpoint: no encoder.patch_embed.proj.weight / queue1 "
                         f"(first keys: {list(sd)[:5]})")
    params_m, state_m = expected(cfg)
    want = {**T.flatten(params_m), **T.flatten(state_m)}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(v.shape)} for the config"
             for k, v in want.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"MoBY checkpoint vs model config: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}, shape mismatches {wrong[:10]}")
    params = T.unflatten({k: sd[k] for k in T.flatten(params_m)})
    state = T.unflatten({k: sd[k] for k in T.flatten(state_m)})
    return params, state


def _swin_with_buffers(t: dict, cfg, prefix: str) -> Dict[str, torch.Tensor]:
    flat = swin_ckpt.export_official(t, cfg.encoder)
    return {prefix + k: v for k, v in flat.items()}


def export_official(params: dict, model_state: dict, cfg) -> Dict[str, torch.Tensor]:
    """The reference's ``MoBY.state_dict()``: same keys in the same order, the Swin
    buffers for ``cfg.encoder.img_size`` in their places; ``load_state_dict(strict=True)``
    on the reference's ``MoBY`` succeeds."""
    out: Dict[str, torch.Tensor] = {k: model_state[k] for k in _QUEUES}
    out.update(_swin_with_buffers(params["encoder"], cfg, "encoder."))
    out.update(_swin_with_buffers(model_state["encoder_k"], cfg, "encoder_k."))
    parts = (("projector", moby.merge(params["projector"], model_state["projector"])),
             ("projector_k", model_state["projector_k"]),
             ("predictor", moby.merge(params["predictor"], model_state["predictor"])))
    for name, t in parts:
        out.update({f"{name}.{k}": v for k, v in T.flatten(t).items()})
    return out


def encoder_state_dict(params: dict, cfg) -> Dict[str, torch.Tensor]:
    """The online encoder as a plain official ``SwinTransformer`` state dict without a
    head (buffers included), the backbone that fine-tuning and linear evaluation start
    from."""
    return swin_ckpt.export_official(params["encoder"], cfg.encoder)


def load_linear(src, swin_cfg) -> dict:
    """A ``moby_linear.py`` checkpoint (``SwinTransformer`` with ``head``; buffers dropped)
    as a Swin tree for ``swin_cfg`` (``mim.models.swin.config`` with its ``num_classes``)."""
    if not isinstance(src, Mapping):
        src = os.fspath(src)
    return swin_ckpt.load_official(src, swin_cfg)


def load_for_finetune(params: dict, path, model_cfg) -> dict:
    """``init.format="moby"``: ``params`` filled from a MoBY checkpoint (official, or a mim
    ``moby_pretrain`` run). For a MoBY model (``model.name="moby"``, continuing
    pretraining) the online encoder, projector and predictor; the task's ``init`` reads the
    momentum branch, queues and statistics of the same file. For a Swin (fine-tuning,
    linear evaluation) the online encoder, with ``params``'s own head, as ``moby_linear.py``'s
    ``load_pretrained``."""
    name = model_cfg.get("name")
    if name == "moby":
        loaded, _ = load_official(path, model_cfg)
        fresh = T.flatten(params)
        got = T.flatten(loaded)
        return T.unflatten({k: got[k].to(device=v.device, dtype=v.dtype) for k, v in fresh.items()})
    if name == "swin":
        return swin_ckpt.load_for_finetune(params, path, model_cfg)
    raise ValueError(f"init.format='moby' loads into a MoBY model or its Swin encoder, not "
                     f"model.name={name!r}")
