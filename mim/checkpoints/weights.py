"""Reading weight files safely (never unpickling arbitrary objects), and starting a
run from a timm or mim checkpoint."""
from __future__ import annotations

import logging
import os
from typing import Dict

import safetensors.torch
import torch

from mim import tree

log = logging.getLogger(__name__)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A flat state_dict from ``.safetensors`` or a torch file loaded with
    ``weights_only=True``; a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is unwrapped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        path = os.path.join(path, "state.safetensors")
    if path.endswith(".safetensors"):
        return safetensors.torch.load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors")
    return obj


def mim_params(path: str) -> Dict[str, torch.Tensor]:
    """The parameters of a mim train-state checkpoint (directory or state.safetensors)."""
    sd = read_state_dict(path)
    params = {k[len("params."):]: v for k, v in sd.items() if k.startswith("params.")}
    if not params:
        raise ValueError(f"{path} is not a mim checkpoint (no 'params.' tensors)")
    return params


def merge_into(params: dict, loaded: Dict[str, torch.Tensor], *, skip=(), adapt=None,
               source: str = "") -> dict:
    """Overwrite ``params`` leaves by name from ``loaded``.

    Names in ``skip`` (e.g. a classifier head of another class count) keep their fresh
    initialisation; ``adapt(name, tensor, target)`` may reshape (position embeddings).
    Any other missing, unexpected or mis-shaped name is an error."""
    flat = tree.flatten(params)
    missing = [k for k in flat if k not in loaded and k not in skip]
    unexpected = [k for k in loaded if k not in flat]
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    out = {}
    for k, t in flat.items():
        if k in skip or k not in loaded:
            out[k] = t
            continue
        v = loaded[k]
        if adapt is not None:
            v = adapt(k, v, t)
        if v.shape != t.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(t.shape)}")
        out[k] = v.to(t.dtype)
    return tree.unflatten(out)
